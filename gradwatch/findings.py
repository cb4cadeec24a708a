"""Finding kinds, severities, message texts, and the public Finding/exception types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

UNCLEARED = "uncleared-gradient"
STALE = "stale-gradient"
DISCARDED = "discarded-gradient"
EMPTY_STEP = "empty-step"
ACCUMULATION_MISMATCH = "accumulation-mismatch"
ORPHAN = "orphan-gradient"
NON_FINITE = "non-finite-gradient"
DANGLING = "dangling-gradient"
UNUSED = "unused-parameter"
CLIP_BEFORE_UNSCALE = "clip-before-unscale"
SKIPPED_STEP = "skipped-step"
REDUNDANT_SYNC = "redundant-sync"
RANK_DIVERGENCE = "rank-divergence"
PRE_EXISTING = "pre-existing-gradient"
LOSS_SCALE = "loss-scale"
UNEVEN_LOSS_WEIGHTS = "uneven-loss-weights"
UNSYNCED = "unsynced-gradient"


@dataclass(frozen=True)
class KindInfo:
    """What every finding of one kind shares: its severity and the timeline lane it is drawn in (the message
    templates are in ``_MESSAGES`` below)."""

    severity: str  # "error" | "warning" | "info"
    lane: str  # "backward" | "step" | "clear": the event where it shows


CATALOGUE: Mapping[str, KindInfo] = {
    UNCLEARED: KindInfo("error", "step"),
    STALE: KindInfo("error", "step"),
    DISCARDED: KindInfo("error", "clear"),
    EMPTY_STEP: KindInfo("error", "step"),
    ACCUMULATION_MISMATCH: KindInfo("error", "step"),
    ORPHAN: KindInfo("error", "backward"),
    NON_FINITE: KindInfo("error", "backward"),
    DANGLING: KindInfo("warning", "backward"),
    UNUSED: KindInfo("info", "step"),
    CLIP_BEFORE_UNSCALE: KindInfo("error", "step"),
    SKIPPED_STEP: KindInfo("info", "step"),
    REDUNDANT_SYNC: KindInfo("warning", "step"),
    RANK_DIVERGENCE: KindInfo("error", "step"),
    PRE_EXISTING: KindInfo("warning", "step"),
    LOSS_SCALE: KindInfo("warning", "step"),
    UNEVEN_LOSS_WEIGHTS: KindInfo("warning", "step"),
    UNSYNCED: KindInfo("error", "step"),
}
SEVERITY: Mapping[str, str] = {kind: info.severity for kind, info in CATALOGUE.items()}
KINDS: tuple[str, ...] = tuple(CATALOGUE)

# Each template gets: params (names, shortened), step, backward, and the occurrence's detail fields. A kind
# whose occurrences say ``how`` it happened has one template per way, keyed (kind, how).
_MESSAGES: Mapping[str | tuple[str, str], str] = {
    UNCLEARED: (
        "backward pass {backward} accumulated into the .grad of {params} that optimizer step {prev_step} had "
        "already consumed, with nothing clearing it in between, so the next step applied that old gradient again. "
        "Call optimizer.zero_grad() after optimizer.step() (or before each accumulation window)."
    ),
    STALE: (
        "optimizer step {step} consumed the .grad of {params} again although no backward pass ran since "
        "the previous step used it: the same gradient was applied twice. Call loss.backward() before each "
        "optimizer.step() and optimizer.zero_grad() after it."
    ),
    DISCARDED: (
        "{source} cleared {fresh} backward pass(es) of gradient in {params} before any optimizer step "
        "consumed them. Move zero_grad() after optimizer.step() (it must not run inside the accumulation "
        "window or between backward() and step()). If the loop computed that gradient only to read it "
        "(gradient logging, a look-ahead), compute it with torch.autograd.grad(...) instead, which leaves .grad alone."
    ),
    (DISCARDED, "part"): (
        "{source} cleared {fresh} backward pass(es) of gradient in {params} before any optimizer step consumed "
        "them, while the optimizer's other parameters kept theirs, so these passes do not train {params}. If these "
        "parameters should not train, freeze them with requires_grad_(False) (backward then computes nothing for "
        "them); otherwise clear gradients only after optimizer.step(), all at once (optimizer.zero_grad())."
    ),
    (DISCARDED, "repeated"): (
        "{source} cleared {fresh} backward pass(es) of gradient in {params} before any optimizer step consumed "
        "them, before two steps in a row. If the loop clears inside its accumulation windows, move zero_grad() "
        "after optimizer.step(). If it runs these passes only to read a gradient (an adversarial attack on the "
        "inputs, per-task gradients), compute them with torch.autograd.grad(...), which leaves .grad alone, or pass "
        "accumulation_steps to watch() so that gradwatch can tell them from the windows the steps consume."
    ),
    (DISCARDED, "not-stepped"): (
        "optimizer[{opt}] never stepped on the gradient that backward pass(es) put into {params}: another "
        "optimizer stepped on those passes, and {source} then found the gradient of {params} unconsumed, so these "
        "parameters are not (or only sometimes) trained. Call optimizer[{opt}].step() after every backward pass "
        "window, or freeze them with requires_grad_(False) if they should not train."
    ),
    EMPTY_STEP: (
        "optimizer step {step} ran while none of its parameters ({params}) held a fresh gradient, so it "
        "updated nothing. Call loss.backward() before optimizer.step(), and do not clear gradients between them."
    ),
    ACCUMULATION_MISMATCH: (
        "optimizer step {step} consumed {window} backward pass(es) but accumulation_steps={expected}. "
        "Check the window arithmetic (e.g. (i + 1) % accumulation_steps == 0), stray backward passes "
        "(sanity checks, validation) and skipped steps."
    ),
    ORPHAN: (
        "{params} received gradients in backward pass {backward} but belong(s) to no watched optimizer, so "
        "they are never updated. Pass them to the optimizer, or freeze them with requires_grad_(False)."
    ),
    NON_FINITE: (
        "backward {where} put NaN or Inf into the .grad of {params}, and an optimizer step consumed "
        "it. Look for log(0), division by zero or overflow in the loss, or skip such batches "
        "(clear the gradients instead of stepping)."
    ),
    DANGLING: (
        "at the end of the run {fresh} backward pass(es) of gradient in {params} were never consumed by an "
        "optimizer step (a partial final accumulation window): those batches were never trained on. Step on the "
        "last, shorter window too (e.g. step when (i + 1) % accumulation_steps == 0 or i + 1 == len(loader)), "
        "or end the run on a window boundary."
    ),
    (DANGLING, "dropped"): (
        "{source} dropped a partial accumulation window ({fresh} backward pass(es) of gradient in {params}) that "
        "no optimizer step consumed: those batches were never trained on (an epoch whose length is not a multiple "
        "of the accumulation steps). Step on the epoch's last, shorter window too (e.g. step when "
        "(i + 1) % accumulation_steps == 0 or i + 1 == len(loader)), or make the number of batches per epoch a "
        "multiple of the accumulation steps. If the loop ran that pass only to read its gradient (gradient logging, "
        "an adversarial attack), compute it with torch.autograd.grad(...) instead, which leaves .grad alone."
    ),
    UNUSED: (
        "{params} never received a gradient although optimizer steps ran. If that is intended (a frozen or "
        "unused branch), set requires_grad_(False); otherwise check that the forward pass uses them."
    ),
    CLIP_BEFORE_UNSCALE: (
        "{clip} clipped the gradients of {params} while GradScaler still had them multiplied by the loss scale, "
        "so the threshold was applied to values thousands of times too large and the real gradients were clipped "
        "far too hard. Call scaler.unscale_(optimizer) before clipping."
    ),
    SKIPPED_STEP: (
        "GradScaler skipped optimizer step {step}: backward {where} put NaN or Inf into {overflowed} of the "
        "{total} scaled gradients of {params}, so the step was not taken and the loss scale was lowered. "
        "Occasional skips are how dynamic loss scaling works; if most steps are skipped, the loss overflows "
        "even unscaled."
    ),
    REDUNDANT_SYNC: (
        "{wasted} of the {passes} backward passes that optimizer step {step} consumed all-reduced the gradients "
        "of {params} across ranks (backward pass {backward} first), although only the window's last one needs "
        "to: {share}% of the window's all-reduces were wasted communication. Run the other backward passes of "
        "each accumulation window (their forward included) inside `with model.no_sync():`."
    ),
    (REDUNDANT_SYNC, "reduce-scatter"): (
        "{wasted} of the {passes} backward passes that optimizer step {step} consumed reduce-scattered the gradients "
        "of {params} across ranks (backward pass {backward} first), although only the window's last one needs "
        "to: {share}% of the window's reduce-scatters were wasted communication. Call "
        "model.set_requires_gradient_sync(False) before the other backward passes of each accumulation window and "
        "model.set_requires_gradient_sync(True) before its last one (FSDP2 then holds the unsharded gradients "
        "between passes: if memory does not allow that, keep syncing every pass and ignore this warning)."
    ),
    UNSYNCED: (
        "optimizer step {step} ran while FSDP2 still held, unreduced and outside .grad, the gradient of {held} "
        "backward pass(es) made with the gradient sync off (from backward pass {backward}) for {params}: the step "
        "did not apply them, and they land in .grad at the next synced pass, in another window. Call "
        "model.set_requires_gradient_sync(True) before the last backward pass of every accumulation window "
        "(a short last one included)."
    ),
    PRE_EXISTING: (
        "optimizer step {step} consumed a gradient that was already in the .grad of {params} when watch() was "
        "called (a sanity-check backward, or an earlier run, left it there), so the step applied it together with "
        "the loop's own. Clear the gradients (optimizer.zero_grad()) before the training loop, and call watch() "
        "before the first backward() so that gradwatch sees where every gradient comes from."
    ),
    (LOSS_SCALE, "unscaled"): (
        "the {loss} of each of the {passes} backward passes that optimizer step {step} consumed reached backward() "
        "undivided, so the step applied the sum of {passes} mean gradients: {factor}x the window's mean (a learning "
        "rate {factor}x too large). Divide each micro-batch's loss by the accumulation steps before backward()."
    ),
    (LOSS_SCALE, "twice"): (
        "optimizer step {step} applied {factor} of its window's mean gradient: the {loss} of each of its {passes} "
        "backward passes was divided by the accumulation steps twice (by the loop and again by a framework, as "
        "accelerator.backward() and Lightning do). Divide it once."
    ),
    (LOSS_SCALE, "short"): (
        "the short window of {passes} backward pass(es) that optimizer step {step} consumed had its {loss} divided by "
        "accumulation_steps={accumulation}, so the step applied {factor} of the window's mean gradient (its batches "
        "count less than the others). Divide the loss of a short window by its real size ({passes}) (under Lightning "
        "or Accelerate, which divide by accumulation_steps themselves, multiply it by {accumulation}/{passes}), or "
        "sum the per-element losses and divide by the window's element count."
    ),
    (UNEVEN_LOSS_WEIGHTS, "mean"): (
        "in the window optimizer step {step} consumed, the {loss} elements of backward pass {heavy} weigh {ratio}x "
        "those of backward pass {light}: each micro-batch's loss is a mean over its own {n_heavy} vs {n_light} "
        "elements (a mean of means). Sum the per-element losses (reduction='sum') and divide by the window's element "
        "count (as Hugging Face's num_items_in_batch does), so that every element weighs the same."
    ),
    (UNEVEN_LOSS_WEIGHTS, "other"): (
        "in the window optimizer step {step} consumed, the {loss} elements of backward pass {heavy} weigh {ratio}x "
        "those of backward pass {light} ({n_heavy} vs {n_light} elements). Divide every micro-batch's loss by the same "
        "number, the window's element count, so that every element weighs the same."
    ),
    RANK_DIVERGENCE: (
        "the ranks disagree at optimizer step {step}: {detail}. Every rank must run the same number of backward "
        "passes per step (a rank-dependent condition, or data of uneven length); otherwise a rank waits for an "
        "all-reduce the others never start, or the replicas silently drift apart."
    ),
}


class GradientBugError(Exception):
    """A gradient-lifecycle bug; ``.findings`` holds the findings that caused it."""

    def __init__(self, message: str, findings: tuple[Finding, ...] = ()) -> None:
        super().__init__(message)
        self.findings = tuple(findings)


class GradientWarning(UserWarning):
    """The category of every warning gradwatch issues."""


@dataclass(frozen=True)
class Finding:
    """One distinct gradient-lifecycle problem, first seen at ``step``/``backward``, ``count`` times so far."""

    kind: str
    severity: str
    step: int
    backward: int
    params: tuple[str, ...]
    message: str
    count: int = 1

    def __str__(self) -> str:
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"[{self.severity}] {self.kind}{times}: {self.message}"


def shorten(names: tuple[str, ...], limit: int = 4) -> str:
    """'a, b, c and 5 more' for messages; the Finding keeps the full tuple."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def format_message(kind: str, params: tuple[str, ...], step: int, backward: int, detail: Mapping[str, object]) -> str:
    """The user-facing message of a finding kind."""
    how = detail.get("how")
    template = _MESSAGES.get((kind, how), None) if isinstance(how, str) else None
    template = template or _MESSAGES[kind]
    fields = {key: value for key, value in detail.items() if key != "how"}
    return template.format(params=shorten(params), step=step, backward=backward, **fields)
