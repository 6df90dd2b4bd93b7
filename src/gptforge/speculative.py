"""Speculative decoding: a small draft model proposes tokens, the target model checks them all in one forward.

Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (https://arxiv.org/abs/2211.17192)
and Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling"
(https://arxiv.org/abs/2302.01318). Each round the draft, with its own KV cache, draws up to K tokens
d_1..d_K one at a time from its distributions q_i; the target then scores the last token and all K drafts in
one forward over its KV cache, which gives its distributions p_1..p_K+1. Draft i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from normalize(max(0, p_i - q_i)) and the
round ends, and when all K are accepted a bonus token is drawn from p_K+1. Each token so produced is
distributed exactly as the target's own (p is `generate.next_token_probs`, what plain sampling draws from:
the same temperature, top_k and top_p), whatever the draft; a good draft only makes more of them accepted.
Greedy decoding (temperature 0) accepts the drafts that are the target's argmax, and so gives plain greedy
decoding's tokens. Both caches are rolled back to the tokens kept.

Context, as `generate.stream`: while the sequence fits the target's block_size, its cache holds every earlier
position; a round proposes no more drafts than fit the target's and the draft's block_size, and none once
they do not fit (a plain step of the target). Past the target's block_size each token conditions on the last
block_size tokens, recomputed, one at a time as plain decoding does: a window that slides cannot check
several tokens in one forward.

Knows token ids and logits only, and models as `generate.py` does; which models, and their tokenizers, are
source.py's.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gptforge.generate import next_token_probs
from gptforge.kv_cache import KVCache
from gptforge.model import GPT

DRAFT_TOKENS = 4  # tokens a draft proposes per round, by default


@dataclass
class Acceptance:
    """What the rounds so far did: draft tokens proposed and accepted, target forwards, tokens produced."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    tokens: int = 0

    @property
    def rate(self) -> float:
        """The share of proposed draft tokens the target accepted (0 when none were proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0


class Speculator:
    """A target and its draft model, both in eval mode on one device, and K, the drafts proposed per round.
    The draft's ids must be the target's (the same tokenizer); a vocabulary padded to another size is fine:
    the draft proposes only ids the target has.

    `round` advances one sequence (batch 1) by 1 to K + 1 tokens, over caches the caller keeps: its own
    KVCaches (`stream`) or views of a server's slots (serve/engine.py).
    """

    def __init__(self, target: GPT, draft: GPT, draft_tokens: int = DRAFT_TOKENS):
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be at least 1, got {draft_tokens}")
        self.target, self.draft, self.draft_tokens = target, draft, draft_tokens
        self.acceptance = Acceptance()

    def caches(self) -> tuple[KVCache, KVCache]:
        """Empty batch-1 caches for the target and the draft."""
        return KVCache(self.target.config, 1), KVCache(self.draft.config, 1)

    @torch.inference_mode()
    def round(
        self,
        seq: torch.Tensor,
        caches: tuple[KVCache, KVCache],
        limit: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """The tokens that follow `seq` (1, L): at least one, at most K + 1 and at most `limit`.

        `caches` (target's, draft's) hold the first `pos` positions of `seq`, each at most L - 1 (0: empty);
        afterwards they hold at most all but the last of the new sequence's tokens.
        """
        target_cache, draft_cache = caches
        length, block_size = seq.size(1), self.target.config.block_size
        if length > block_size:  # the window slid: recompute it, as plain decoding does
            target_cache.reset()
            logits, _ = self.target(seq[:, length - block_size:], kv_cache=target_cache)
            return self._count(accept([], logits[0], [], temperature, top_k, top_p, generator), 0, 0)
        k = max(0, min(self.draft_tokens, limit - 1, block_size - length,
                       self.draft.config.block_size + 1 - length))
        ext = torch.cat([seq, seq.new_empty(1, k)], dim=1)
        vocab_size = self.target.config.vocab_size
        drafts: list[int] = []
        q = []
        for i in range(k):
            logits, _ = self.draft(ext[:, draft_cache.pos:length + i], kv_cache=draft_cache)
            logits = logits[0, -1, :vocab_size]
            if temperature == 0:
                drafts.append(int(logits.argmax()))
            else:
                q.append(fit_probs(next_token_probs(logits, temperature, top_k, top_p), vocab_size))
                drafts.append(int(torch.multinomial(q[-1], 1, generator=generator)))
            ext[0, length + i] = drafts[-1]
        # the target's logits after the last token and after each draft: k + 1 rows
        hidden = self.target.hidden_states(ext[:, target_cache.pos:], kv_cache=target_cache)
        logits = self.target.head(hidden[0, -(k + 1):])
        tokens = accept(drafts, logits, q, temperature, top_k, top_p, generator)
        kept = length + len(tokens) - 1  # all but the last new token: what the caches may hold
        target_cache.pos, draft_cache.pos = min(target_cache.pos, kept), min(draft_cache.pos, kept)
        return self._count(tokens, k, len(tokens) - 1)

    def _count(self, tokens: list[int], proposed: int, accepted: int) -> list[int]:
        stats = self.acceptance
        stats.proposed, stats.accepted = stats.proposed + proposed, stats.accepted + accepted
        stats.rounds, stats.tokens = stats.rounds + 1, stats.tokens + len(tokens)
        return tokens


def fit_probs(probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A draft distribution over the target's `vocab_size` ids: zero for ids the draft does not have."""
    return F.pad(probs, (0, vocab_size - probs.size(-1))) if probs.size(-1) < vocab_size else probs


def accept(
    drafts: list[int],
    logits: torch.Tensor,
    q: list[torch.Tensor],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens a round keeps: the accepted drafts and then a correction (at the first rejection) or a
    bonus token (all accepted), from the target's `logits` (k + 1, V) and the draft distributions `q`."""
    if temperature == 0:  # greedy: the drafts that are the target's argmax, then the target's argmax
        best = logits.argmax(dim=-1).tolist()
        n = next((i for i, (d, b) in enumerate(zip(drafts, best, strict=False)) if d != b), len(drafts))
        return [*drafts[:n], best[n]]
    p = next_token_probs(logits, temperature, top_k, top_p)
    for i, token in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i][token] < p[i, token]:  # accepted with probability min(1, p / q)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if not residual.sum() > 0:  # p == q up to rounding: the residual rule has nothing left, p itself
            residual = p[i]
        return [*drafts[:i], int(torch.multinomial(residual, 1, generator=generator))]
    return [*drafts, int(torch.multinomial(p[-1], 1, generator=generator))]


def report(acceptance: Acceptance) -> str:
    """One line on how speculative decoding went: the acceptance rate, tokens per target forward."""
    per_round = acceptance.tokens / acceptance.rounds if acceptance.rounds else 0.0
    return (f"speculative decoding: {acceptance.accepted} of {acceptance.proposed} draft tokens accepted "
            f"({acceptance.rate:.0%}), {per_round:.2f} tokens per forward of the model")


@torch.inference_mode()
def stream(
    speculator: Speculator,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_tokens: Iterable[int] | None = None,
) -> Iterator[torch.Tensor]:
    """`generate.stream` for one sequence (idx of shape (1, T)), speculatively: yields each new token as a
    (1,) tensor, up to `max_new_tokens` of them or up to and including the first of `stop_tokens`."""
    if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) == 0:
        raise ValueError(f"speculative decoding takes one sequence (1, time), got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    T = idx.size(1)
    seq = torch.empty(1, T + max_new_tokens, dtype=torch.long, device=idx.device)
    seq[:, :T] = idx
    caches = speculator.caches()
    stops = set(stop_tokens or ())
    length = T
    while length < T + max_new_tokens:
        for token in speculator.round(seq[:, :length], caches, T + max_new_tokens - length, temperature,
                                      top_k, top_p, generator):
            seq[0, length] = token
            length += 1
            yield seq[0, length - 1 : length]
            if token in stops:
                return
