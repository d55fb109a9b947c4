"""Verification of draft tokens against the target model's logits, preserving its distribution exactly.

For each request with drafts ``d_0 .. d_{k-1}`` the runner computed target logits at ``k + 1`` positions:
position ``j`` predicts the token after ``d_{j-1}`` (position 0 the token after the last verified one).
Every position is processed as the plain sampler would process it at that point of the sequence: penalties
see the drafts before it as output, and EOS/stop ids stay suppressed while ``min_tokens`` is not reached.

Greedy rows accept the longest prefix of drafts equal to the target's argmax, then add the target's argmax.
Sampling rows use rejection sampling (Leviathan et al. 2023, Chen et al. 2023): draft ``d_j`` drawn from
``q_j`` is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``; the first rejected position draws its
token from ``normalise(max(p_j - q_j, 0))``; if every draft is accepted one more token comes from ``p_k``.
A deterministic proposer (n-gram lookup) is a point mass: ``q_j(d_j) = 1``, so acceptance is ``p_j(d_j)``
and the residual is ``p_j`` with ``d_j`` removed. Random draws come from the request's own generator when
it has a seed, so a seeded request's tokens do not depend on the batch.
"""

from __future__ import annotations

import torch

from pagedserve.runtime.sampler import (
    Sampler,
    SamplingRow,
    compute_logprobs,
    suppressed_token_ids,
    warped_probs,
)

VerifiedTokens = tuple[list[int], list | None]  # tokens produced (accepted drafts + one), their logprobs


def target_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The normalised distribution ``Sampler`` draws each (non-greedy) row from: temperature, top-k, top-p,
    min-p applied to already processed ``logits``, in the sampler's order and with its top-k/top-p code."""
    probs = warped_probs(logits, rows, [r.params.temperature for r in rows])
    return probs / probs.sum(dim=-1, keepdim=True)


def _position_rows(row: SamplingRow, drafts: list[int], eos_token_ids: tuple[int, ...]) -> list[SamplingRow]:
    """The sampler's view of one request at each of its ``len(drafts) + 1`` verified positions."""
    p = row.params
    rows = []
    for j in range(len(drafts) + 1):
        outputs = row.output_token_ids + drafts[:j] if j else row.output_token_ids
        suppressed = suppressed_token_ids(p, len(outputs), eos_token_ids)
        rows.append(SamplingRow(p, row.generator, row.prompt_token_ids, outputs, suppressed))
    return rows


def verify_drafts(
    sampler: Sampler,
    logits: torch.Tensor,
    rows: list[SamplingRow],
    drafts: list[list[int]],
    eos_token_ids: list[tuple[int, ...]],
    draft_probs: list[torch.Tensor | None] | None = None,
) -> list[VerifiedTokens]:
    """Verify each request's drafts; ``logits`` holds ``len(drafts[r]) + 1`` rows per request, in order.

    ``draft_probs[r]`` is the ``[k, vocab]`` distribution the drafts of request ``r`` were sampled from, or
    None for a deterministic proposer.
    """
    raw_logits = logits.float()
    pos_rows: list[SamplingRow] = []
    starts: list[int] = []
    for row, d, eos in zip(rows, drafts, eos_token_ids, strict=True):
        starts.append(len(pos_rows))
        pos_rows.extend(_position_rows(row, d, eos))
    if len(pos_rows) != raw_logits.shape[0]:
        raise ValueError(f"verify_drafts: {raw_logits.shape[0]} logit rows for {len(pos_rows)} positions")
    processed = sampler._apply_logit_processors(raw_logits, pos_rows)
    greedy = [r.params.temperature == 0.0 for r in rows]

    results: list[list[int]] = [[] for _ in rows]
    if any(greedy):
        argmax = processed.argmax(dim=-1).tolist()
        for r, (d, s) in enumerate(zip(drafts, starts, strict=True)):
            if not greedy[r]:
                continue
            target = argmax[s:s + len(d) + 1]
            a = 0
            while a < len(d) and d[a] == target[a]:
                a += 1
            results[r] = d[:a] + [target[a]]
    sampling = [r for r, g in enumerate(greedy) if not g]
    if sampling:
        _rejection_sample(sampler, processed, pos_rows, starts, drafts, draft_probs, sampling, results)

    out: list[VerifiedTokens] = []
    for r, (row, s) in enumerate(zip(rows, starts, strict=True)):
        toks = results[r]
        lps = None
        if row.params.logprobs is not None:
            # OpenAI/vLLM semantics: the raw distribution's logprobs, before any processing.
            lp = torch.log_softmax(raw_logits[s:s + len(toks)], dim=-1)
            lps = [compute_logprobs(lp[j], torch.tensor(t), row.params.logprobs) for j, t in enumerate(toks)]
        out.append((toks, lps))
    return out


def _rejection_sample(sampler, processed, pos_rows, starts, drafts, draft_probs, sampling, results) -> None:
    device = processed.device
    idx = [starts[r] + j for r in sampling for j in range(len(drafts[r]) + 1)]
    sub_rows = [pos_rows[i] for i in idx]
    probs = target_probs(processed[idx], sub_rows)
    final_dists = []
    gens = []
    offset = 0
    for r in sampling:
        d = drafts[r]
        k = len(d)
        p = probs[offset:offset + k + 1]
        offset += k + 1
        gen = pos_rows[starts[r]].generator or sampler.generator
        q = draft_probs[r] if draft_probs is not None else None
        d_t = torch.tensor(d, dtype=torch.long, device=device)
        p_draft = p[:k].gather(1, d_t.unsqueeze(1)).squeeze(1)
        if q is None:
            accept_prob = p_draft
        else:
            q_draft = q.gather(1, d_t.unsqueeze(1)).squeeze(1)
            accept_prob = torch.clamp(p_draft / q_draft, max=1.0)
        # All k uniforms drawn every time, so a seeded request's stream depends on its history only.
        u = torch.rand(k, generator=gen, device=device, dtype=p.dtype)
        accepted = (u < accept_prob).tolist()
        a = 0
        while a < k and accepted[a]:
            a += 1
        if a < k:
            if q is None:
                dist = p[a].clone()
                dist[d[a]] = 0.0
            else:
                dist = torch.clamp(p[a] - q[a], min=0.0)
            if float(dist.sum()) <= 0.0:  # p_a was (numerically) all on the rejected draft
                dist = p[a]
        else:
            dist = p[k]
        results[r] = d[:a]
        final_dists.append(dist)
        gens.append(gen)
    # The exponential race argmax(dist / Exp(1)) samples from dist without normalising it.
    for r, dist, gen in zip(sampling, final_dists, gens, strict=True):
        e = torch.empty_like(dist).exponential_(generator=gen)
        results[r].append(int((dist / e).argmax()))
