"""What `POST /v1/chat/completions` does: a conversation, rendered with the model's chat template, becomes an
engine job, and the job's deltas become one `chat.completion` or a stream of `chat.completion.chunk` events.

It holds chat's policy: the messages it takes (system, developer as system, user and assistant, with text
content), the prompt the template renders from them (chat_template.py: it ends with the assistant's marker),
the answer's stop at the template's end-of-turn id, how long an answer may grow, and its logprobs (the
answer's tokens, the end marker left out, as it is from the text). The jobs, the deltas, logit_bias and
cancelling a request whose client left are completions.py's plumbing; the shapes are api.py's and
logprobs.py's; the route is app.py's.
"""

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from gptforge.chat_template import ChatTemplate
from gptforge.errors import GptforgeError
from gptforge.serve.api import (
    MAX_TOP_LOGPROBS,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    chat_choice,
    chat_header,
    chunk_choice,
    usage,
)
from gptforge.serve.completions import (
    Deltas,
    EngineFailure,
    cancel,
    check_model,
    gather,
    logit_bias,
    sse,
    stop_strings,
    submit,
    vocabulary,
)
from gptforge.serve.engine import Engine, Job, Sampling, TokenLogprob
from gptforge.serve.logprobs import TokenStrings, chat_logprobs

# OpenAI's roles as the template's; "developer" is what OpenAI's newer models call the system message
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# a message's fields for what this server does not do: set, they are refused by name
UNSUPPORTED = ("tool_calls", "tool_call_id", "function_call", "refusal", "audio")
NO_TEMPLATE = "this model has no chat template: finetune it with `gptforge sft`"


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them: {"role", "content"} with the content's text; a 400
    naming the field (`messages[1].role`) for anything else."""
    if not messages:
        raise APIError(400, "messages is empty: a chat needs at least one message", "messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role not in ROLES:
            raise APIError(400, f"{where}.role: the role {message.role!r} is not supported by gptforge "
                                f"serve; use one of {', '.join(ROLES)}", f"{where}.role")
        for name in UNSUPPORTED:
            if getattr(message, name) is not None:
                raise APIError(400, f"{where}.{name} is not supported by gptforge serve", f"{where}.{name}")
        turns.append({"role": ROLES[message.role], "content": text_of(message, where)})
    return turns


def text_of(message: ChatMessage, where: str) -> str:
    """A message's content as one text: a string, or its text parts joined by newlines."""
    if message.content is None:
        raise APIError(400, f"{where}.content is missing: every message needs its text", f"{where}.content")
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text":
            raise APIError(400, f"{where}.content[{j}].type: {part.type!r} content is not supported by "
                                "gptforge serve, only text", f"{where}.content[{j}].type")
        if part.text is None:
            raise APIError(400, f"{where}.content[{j}].text is missing: a text part needs its text",
                           f"{where}.content[{j}].text")
        texts.append(part.text)
    return "\n".join(texts)


class Chat:
    """Chat completions from `engine`'s model, served as `model_id`, rendered with `template` (None: the
    model has none, and every chat request is a 400), answers of at most `max_tokens_limit` tokens."""

    def __init__(self, engine: Engine, model_id: str, max_tokens_limit: int, template: ChatTemplate | None):
        self.engine, self.tokenizer, self.model_id = engine, engine.tokenizer, model_id
        self.max_tokens_limit, self.template = max_tokens_limit, template
        # an answer ends with its turn; end-of-text, where the tokenizer has one, ends it too: no answer goes
        # on past the end of a text (a habit a finetuned base may keep)
        eot = self.tokenizer.eot_token
        self.stop_tokens = frozenset() if template is None else frozenset(
            {template.end} if eot is None else {template.end, eot})
        self.strings = TokenStrings(self.tokenizer)

    async def respond(
        self, body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        """The answer to `body`: one JSON body, or server-sent events when it asks to stream."""
        check_model(body.model, self.model_id)
        template = self.template
        if template is None:
            raise APIError(400, NO_TEMPLATE, "messages", "no_chat_template")
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by gptforge serve", name)
        ids = self.render(template, conversation(body.messages))
        top = self.top_logprobs(body)
        temperature = 1.0 if body.temperature is None else body.temperature
        sampling = Sampling(self.max_tokens(body, len(ids)), temperature, body.top_k, body.top_p,
                            stop_strings(body.stop), body.seed, self.stop_tokens,
                            logit_bias=logit_bias(body.logit_bias, vocabulary(self.engine)),
                            presence_penalty=body.presence_penalty or 0.0,
                            frequency_penalty=body.frequency_penalty or 0.0, logprobs=top)
        n = body.n or 1
        deltas, jobs = submit(self.engine, [ids], n, sampling)
        header = chat_header(self.model_id, self.engine.fingerprint)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self.stream(deltas, jobs, header, len(ids) if include_usage else None, top is not None),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        answers = await gather(self.engine, request, deltas, jobs)
        if answers is None:  # the client is gone: nobody reads this
            return JSONResponse({}, status_code=499)
        choices = [chat_choice(i, a.text, a.finish_reason,
                               None if top is None else self.logprobs(a.logprobs))
                   for i, a in enumerate(answers)]
        completion_tokens = sum(a.tokens for a in answers)
        return JSONResponse({**header, "choices": choices, "usage": usage(len(ids), completion_tokens)})

    @staticmethod
    def top_logprobs(body: ChatCompletionRequest) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs): `top_logprobs` needs
        `logprobs: true`, as at OpenAI, and is at most MAX_TOP_LOGPROBS."""
        if not body.logprobs:
            if body.top_logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            return None
        top = body.top_logprobs or 0
        if top > MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs is {top}: at most {MAX_TOP_LOGPROBS}, as OpenAI's chat "
                                "completions allow", "top_logprobs")
        return top

    def logprobs(self, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's chat logprobs of an answer's tokens; its end marker (or end-of-text) is left out, as it
        is from the text."""
        return chat_logprobs(self.strings, [e for e in entries if e.token not in self.stop_tokens])

    def render(self, template: ChatTemplate, turns: list[dict[str, str]]) -> list[int]:
        """The prompt's ids: the conversation, then the assistant's marker. A 400 naming the message whose
        text the tokenizer cannot encode (a character a char model does not know)."""
        try:
            return template.render(self.tokenizer, turns, add_generation_prompt=True)[0]
        except GptforgeError:
            for i, turn in enumerate(turns):
                try:
                    self.tokenizer.encode(turn["content"])
                except GptforgeError as e:
                    raise APIError(400, f"messages[{i}].content cannot be tokenized: {e}",
                                   f"messages[{i}].content") from None
            raise

    def max_tokens(self, body: ChatCompletionRequest, prompt_tokens: int) -> int:
        """The answer's token budget: `max_completion_tokens` or its older name `max_tokens`; neither, all the
        room the context leaves (up to the server's limit), as OpenAI's default is."""
        both = body.max_tokens is not None and body.max_completion_tokens is not None
        if both and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, f"max_tokens ({body.max_tokens}) and max_completion_tokens "
                                f"({body.max_completion_tokens}) differ: give one of them",
                           "max_completion_tokens")
        name = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        asked = body.max_completion_tokens or body.max_tokens
        if asked is None:  # a prompt that fills the context asks for 1: the engine's context error says so
            return max(1, min(self.max_tokens_limit, self.engine.model.config.block_size - prompt_tokens))
        if asked > self.max_tokens_limit:
            raise APIError(400, f"{name} is {asked}, above this server's limit of {self.max_tokens_limit}",
                           name)
        return asked

    async def stream(
        self, deltas: Deltas, jobs: list[Job], header: dict[str, Any], prompt_tokens: int | None,
        logprobs: bool,
    ) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them: each choice's role first, then its text piece by piece,
        then an empty delta with its finish_reason; the usage when asked for (every other chunk then has
        `"usage": null`), then [DONE]. A piece's logprobs come with it (those of tokens whose text a stop
        string cut off, with the finish). Starlette cancels this generator when the client disconnects;
        `finally` then frees the job's slots."""
        head = {**header, "object": "chat.completion.chunk"}
        tail = {} if prompt_tokens is None else {"usage": None}

        def chunk(index: int, delta: dict[str, str], finish_reason: str | None = None,
                  logprobs: dict[str, Any] | None = None) -> str:
            return sse({**head, "choices": [chunk_choice(index, delta, finish_reason, logprobs)], **tail})

        completion_tokens = 0
        try:
            for index in range(jobs[0].n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for index, delta in deltas:
                completion_tokens += delta.tokens
                pending = self.logprobs(delta.logprobs) if logprobs else None
                if delta.text:
                    yield chunk(index, {"content": delta.text}, logprobs=pending)
                    pending = None
                if delta.finish_reason is not None:
                    cut_off = pending if pending and pending["content"] else None
                    yield chunk(index, {}, delta.finish_reason, cut_off)
            if prompt_tokens is not None:
                yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        except EngineFailure as e:
            yield sse(APIError(500, str(e)).body())
        finally:
            cancel(self.engine, jobs)
