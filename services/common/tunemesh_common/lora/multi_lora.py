"""Multi-adapter LoRA linears: each row of a fused batch uses its own adapter's A and B.

A `LoraRouting` object, shared by every wrapped linear of one model, carries the current
batch's row -> adapter plan (one per thread); outside a batch the wrappers compute the base
model alone.
Fused 3-D MoE experts get per-expert LoRA the same way (see `MultiLoraExperts`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tunemesh_common.lora.batched_lora import StackCache, add_batched_lora
from tunemesh_common.numerics import batch_invariant
from tunemesh_common.numerics.batch_invariant import BatchInvariantMode, FrozenBaseMode, batched_gemm_rows

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # fused 3-D expert weights, (experts, out, in)
AdapterSlotKey = tuple[str | None, bool]  # (adapter id or None, whether its LoRA trains)
ExpertGroups = list[tuple[AdapterSlotKey, int]]  # (slot, token count) of one expert's tokens


def full_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's shape, also when ZeRO-3 has partitioned it (then the tensor is empty and
    `ds_shape` holds the shape)."""
    return getattr(weight, "ds_shape", weight.shape)


@dataclasses.dataclass
class LoraPair:
    """One adapter's LoRA factors on one linear: delta(x) = scale * x @ A.T @ B.T.

    On fused experts (`experts` > 1) the factors hold every expert's, in PEFT's layout for
    `target_parameters`: A is (experts * rank, in) with expert e's rows at e*rank..(e+1)*rank,
    B is (out, rank * experts) with expert e's columns at e, e+experts, e+2*experts, ...
    """

    a: nn.Parameter  # (rank [* experts], in_features)
    b: nn.Parameter  # (out_features, rank [* experts])
    scale: float
    experts: int = 1

    @property
    def rank(self) -> int:
        return int(self.a.shape[0]) // self.experts

    def expert_factors(self, expert: int, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `expert`'s (A (rank, in), B (out, rank)), views of the fused factors."""
        a, b = (self.a.detach(), self.b.detach()) if detach else (self.a, self.b)
        rank = self.rank
        return a[expert * rank : (expert + 1) * rank], b[:, expert :: self.experts]


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """Which adapter each row of the current batch uses.

    Rows of one item are contiguous, so the plan is a list of segments
    `(adapter_id, first_row, end_row)`. Adapters outside `trainable` are used detached
    (no graph, no gradient).
    """

    segments: tuple[tuple[str, int, int], ...]
    trainable: frozenset[str]

    @property
    def num_rows(self) -> int:
        return self.segments[-1][2] if self.segments else 0


@dataclasses.dataclass(frozen=True)
class LoraGroup:
    """Segments whose LoRA runs as one batched matmul pair: `adapters` (one per segment, in
    row order), each over `tokens` positions of the flattened batch; `index` holds every
    segment's positions one after another, `span` (first, end) where they are one run back
    to back (the group's rows are then a view)."""

    adapters: tuple[str, ...]
    tokens: int
    span: tuple[int, int] | None
    index: torch.Tensor

    @classmethod
    def of(cls, members: list[tuple[str, torch.Tensor]], device: torch.device) -> LoraGroup:
        """The group of `members` (adapter id, its positions on the CPU); `index` on `device`."""
        index = torch.cat([positions for _, positions in members])
        first = int(index[0]) if len(index) else 0
        back_to_back = bool(torch.equal(index, torch.arange(first, first + len(index))))
        return cls(tuple(aid for aid, _ in members), len(members[0][1]),
                   (first, first + len(index)) if back_to_back else None, index.to(device))


class GroupedLora(torch.autograd.Function):
    """delta = (x @ A.T @ B.T) * scale for each matrix of a batch (x (S, tokens, in), A (S, r,
    in), B (S, out, r), scale (S, 1, 1)): PEFT's order of operations, with the gradients of
    x, A and B in batched matmuls too.

    Batch invariance: a batched matmul of two or more matrices runs each GEMM on one thread,
    and one of a single matrix is run on one thread here too (`alone`), so a segment's
    numbers (forward and gradients) depend only on its own shape, not on how many segments
    share its group (tests/unit/common/test_grouped_lora.py checks that on the running
    host)."""

    @staticmethod
    def forward(ctx, x, a, b, scale, alone: bool):
        with batch_invariant.one_thread_if(alone):
            hidden = torch.bmm(x, a.transpose(1, 2))
            delta = torch.bmm(hidden, b.transpose(1, 2))
        delta.mul_(scale)
        ctx.save_for_backward(x, a, b, hidden, scale)
        ctx.alone = alone
        return delta

    @staticmethod
    def backward(ctx, grad):
        x, a, b, hidden, scale = ctx.saved_tensors
        grad = grad * scale
        grad_x = grad_a = grad_b = None
        with batch_invariant.one_thread_if(ctx.alone):
            if ctx.needs_input_grad[2]:
                grad_b = torch.bmm(grad.transpose(1, 2), hidden)
            grad_hidden = torch.bmm(grad, b)
            if ctx.needs_input_grad[1]:
                grad_a = torch.bmm(grad_hidden.transpose(1, 2), x)
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(grad_hidden, a)
        return grad_x, grad_a, grad_b, None, None


class _PassState(threading.local):
    """What `LoraRouting.use` sets for the pass running on this thread."""

    def __init__(self) -> None:
        self.plan: RowPlan | None = None
        self.batched = False
        self.real_tokens: torch.Tensor | None = None
        self.on_route: Callable[[torch.Tensor, int], None] | None = None
        self.real_index: dict[tuple[int, int], torch.Tensor | None] = {}
        self.groups: dict[tuple, list[LoraGroup]] = {}


class LoraRouting:
    """Holds the plan of the batch now running; set it with `use`. Each thread sees the plan
    it set: passes over disjoint adapters may run at once on threads of one process (the
    trainer's lanes), every wrapped linear reading its own thread's plan."""

    def __init__(self) -> None:
        self._pass = _PassState()
        # set by an engine in batch-invariant mode: batched LoRA only where it gives the
        # grouped path's bits (adapters of one rank; see batched_lora.py)
        self.batch_invariant = False

    @property
    def plan(self) -> RowPlan | None:
        return self._pass.plan

    @property
    def batched(self) -> bool:
        """Set by `use(plan, batched=True)` (inference): every adapter's LoRA in batched
        matmuls over factors stacked once (batched_lora.py) instead of grouped per pass."""
        return self._pass.batched

    @property
    def real_tokens(self) -> torch.Tensor | None:
        """Set by `use(..., real_tokens=)`: which of the batch's (rows x length) tokens are not
        padding; in batch-invariant mode LoRA (on linears and MoE experts) then skips the
        padding, so an adapter's gradient sums over its own tokens only, however long the
        batch's rows (a sum over more, zero, terms is not always the same bits)."""
        return self._pass.real_tokens

    @property
    def on_route(self) -> Callable[[torch.Tensor, int], None] | None:
        """Called by every MoE experts layer with its (tokens, top_k) expert choices, if set."""
        return self._pass.on_route

    @on_route.setter
    def on_route(self, record: Callable[[torch.Tensor, int], None] | None) -> None:
        self._pass.on_route = record

    def real_rows(self) -> torch.Tensor | None:
        """The (rows, length) non-padding mask where LoRA must skip padding, else None."""
        state = self._pass
        if not self.batch_invariant or state.real_tokens is None or state.plan is None:
            return None
        return state.real_tokens.reshape(state.plan.num_rows, -1)

    def real_index(self, first_row: int, end_row: int) -> torch.Tensor | None:
        """Where LoRA must skip padding: the positions of rows first_row..end_row's own tokens
        among those rows' (rows x length) positions, row-major (worked out once per batch);
        None where those rows have no padding (every position is theirs: the same GEMMs
        over the same positions, without gathering and scattering them)."""
        real = self.real_rows()
        if real is None:
            return None
        known, key = self._pass.real_index, (first_row, end_row)
        if key not in known:
            rows = real[first_row:end_row]
            known[key] = None if bool(rows.all()) else rows.reshape(-1).nonzero().squeeze(1)
        return known[key]

    def lora_groups(self, mine: tuple[tuple[str, int, int, int], ...], length: int,
                    device: torch.device) -> list[LoraGroup]:
        """The segments `mine` ((adapter id, first row, end row, rank) of the segments with LoRA on
        a linear) grouped for `GroupedLora`: the segments of one rank and one token count go
        together, in row order; their tokens are the rows' positions of a (rows x length) batch,
        padding skipped where `real_index` says so. Worked out once per batch (every linear with
        the same adapters asks the same), the groups' positions moved to `device` once."""
        known, key = self._pass.groups, (mine, length)
        if key not in known:
            by_shape: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
            for adapter_id, first, end, rank in mine:
                real = self.real_index(first, end)
                positions = torch.arange(first * length, end * length) if real is None else real.cpu() + first * length
                by_shape.setdefault((rank, len(positions)), []).append((adapter_id, positions))
            known[key] = [LoraGroup.of(members, device) for members in by_shape.values()]
        return known[key]

    @contextlib.contextmanager
    def use(self, plan: RowPlan, batched: bool = False, real_tokens: torch.Tensor | None = None) -> Iterator[None]:
        """Run under `plan` on this thread; `batched` (only without trainable adapters) applies
        LoRA in batched matmuls; `real_tokens` (bool, rows x length flattened) marks non-padding."""
        if batched and plan.trainable:
            raise ValueError("batched LoRA has no gradients: the plan must have no trainable adapter")
        state = self._pass
        state.plan, state.batched, state.real_tokens, state.real_index, state.groups = (
            plan, batched, real_tokens, {}, {})
        try:
            yield
        finally:
            state.plan, state.batched, state.real_tokens, state.real_index, state.groups = None, False, None, {}, {}


ONE_THREAD_LORA_TOKENS = 256  # batched LoRA over at most this many tokens runs on one thread


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus per-adapter LoRA factors, selected per row."""

    def __init__(self, base: nn.Linear, routing: LoraRouting) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.pairs: dict[str, LoraPair] = {}  # plain dict: adapter weights are not module state
        self._stacks = StackCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            # e.g. the vocab head on each row's last position (`logits_to_keep`): over a
            # strided 3-D bfloat16 input, torch's CPU linear copied the weight once per row
            # (64 x 576 x 49152 for SmolLM2: 6 s of a 9 s prefill)
            x = x.contiguous()
        with FrozenBaseMode(self.routing.batch_invariant):  # through the module: ZeRO-3's hooks gather its weight
            out = self.base(x)
        plan = self.routing.plan
        if plan is None or not any(aid in self.pairs for aid, _, _ in plan.segments):
            return out
        if self.routing.batched:
            batched = self._batched(plan, x, out)
            if batched is not None:
                return batched
        return self._grouped(plan, x, out)

    def _grouped(self, plan: RowPlan, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus each segment's LoRA, the segments of one rank and one token
        count in one `GroupedLora` (two batched matmuls, gradients through the stacked factors
        of trainable adapters): a fused step of 8 adapters runs ~8x fewer, larger operations
        per linear than segment by segment. In batch-invariant mode padding is skipped
        (`real_index`) and a group of fewer than 4 tokens is padded to 4 rows (the fewest for
        which one thread sums a row as any larger GEMM does: the sampler's bits)."""
        rows = plan.num_rows
        length = x.numel() // x.shape[-1] // rows
        mine = tuple((aid, start, end, self.pairs[aid].rank) for aid, start, end in plan.segments if aid in self.pairs)
        x_flat, width = x.reshape(-1, x.shape[-1]), out.shape[-1]
        invariant = self.routing.batch_invariant
        result = out
        for group in self.routing.lora_groups(mine, length, x.device):
            pairs = [(self.pairs[aid], aid in plan.trainable) for aid in group.adapters]
            a = torch.stack([pair.a if trains else pair.a.detach() for pair, trains in pairs])
            b = torch.stack([pair.b if trains else pair.b.detach() for pair, trains in pairs])
            scale = torch.tensor([pair.scale for pair, _ in pairs], dtype=a.dtype, device=a.device).view(-1, 1, 1)
            segments = len(pairs)
            x_g = x_flat[group.span[0] : group.span[1]] if group.span else x_flat.index_select(0, group.index)
            x_g = x_g.reshape(segments, group.tokens, -1).to(a.dtype)
            min_rows = batched_gemm_rows(segments) if invariant else 0
            if group.tokens < min_rows:
                x_g = torch.cat([x_g, x_g.new_zeros(segments, min_rows - group.tokens, x_g.shape[-1])], dim=1)
            delta = GroupedLora.apply(x_g, a, b, scale, invariant and segments == 1)[:, : group.tokens]
            delta = delta.reshape(-1, width).to(out.dtype)
            # not in place: the base's output may be a view made inside its autograd Function
            if group.span == (0, len(x_flat)):
                result = result + delta.view(result.shape)
            else:
                result = result.reshape(-1, width).index_add(0, group.index, delta)
        return result.view(out.shape)

    def _batched(self, plan: RowPlan, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """Every segment's LoRA in two batched matmuls (no gradients; the factors stacked once
        per set of adapters); None where `_grouped` must run instead (mixed ranks in
        batch-invariant mode)."""
        mine = [(aid, start, end) for aid, start, end in plan.segments if aid in self.pairs]
        ids = tuple(aid for aid, _, _ in mine)
        stacked = self._stacks.get(ids, [self.pairs[aid] for aid in ids])
        min_rows = 0
        if self.routing.batch_invariant:
            if not stacked.uniform_rank:
                return None
            min_rows = batched_gemm_rows(len(mine))
        # a decode step's dozen small operations: on one thread they wake no other (a batched matmul
        # of several matrices runs one thread per matrix either way, so the numbers are the same);
        # a prefill's are large enough to share
        small = x.numel() <= ONE_THREAD_LORA_TOKENS * x.shape[-1]
        with batch_invariant.one_thread_if(small):
            return add_batched_lora(x, out, plan.num_rows, tuple((start, end) for _, start, end in mine), stacked,
                                    min_rows, batch_invariant.bmm if self.routing.batch_invariant else torch.bmm)


def candidate_targets(model: nn.Module) -> dict[str, str]:
    """Linears LoRA may target, name -> group ("attn", "mlp", "unembed").

    Only dense MLP linears count as "mlp": fused 3-D MoE experts are not nn.Linear.
    """
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in ATTENTION_NAMES and parent.endswith(("self_attn", "attention", "attn")):
            found[name] = "attn"
        elif leaf in DENSE_MLP_NAMES and parent.endswith("mlp"):
            found[name] = "mlp"
    unembed = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is unembed and isinstance(module, nn.Linear):
            found[name] = "unembed"
    return found


def install_wrappers(
    model: nn.Module, names: list[str], routing: LoraRouting
) -> dict[str, MultiLoraLinear]:
    """Replace each named linear by a MultiLoraLinear sharing `routing`."""
    return {name: _replace(model, name, lambda base: MultiLoraLinear(base, routing)) for name in names}


def _replace(model: nn.Module, name: str, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Put `wrap(submodule)` in the submodule's place; return the wrapper."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = wrap(getattr(parent, leaf))
    setattr(parent, leaf, wrapper)
    return wrapper


class MultiLoraExperts(nn.Module):
    """Fused MoE experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)) plus per-adapter,
    per-expert LoRA on both. Token choices (expert, adapter) are grouped so that each
    group's LoRA is one matmul pair; without LoRA in the batch the base module runs as is.

    With an `exchange` (expert parallelism) this module holds only the base weights of
    `local_experts`, and the exchange runs every forward across the ranks that share them.
    """

    def __init__(self, base: nn.Module, routing: LoraRouting) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.num_experts = int(full_shape(base.gate_up_proj)[0])
        self.local_experts = range(self.num_experts)  # experts whose base weights `base` holds
        self.exchange: Callable[..., torch.Tensor] | None = None
        self.pairs: dict[str, dict[str, LoraPair]] = {p: {} for p in EXPERT_PARAMETERS}

    def forward(self, hidden_nh: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.routing.batch_invariant:
            with BatchInvariantMode():
                return self._forward(hidden_nh, top_k_index, top_k_weights)
        return self._forward(hidden_nh, top_k_index, top_k_weights)

    def _forward(self, hidden_nh: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.routing.on_route is not None:
            self.routing.on_route(top_k_index, self.num_experts)
        plan = self.routing.plan
        if self.exchange is not None:
            return self.exchange(self, plan, hidden_nh, top_k_index, top_k_weights)
        adapters = [] if plan is None else sorted(
            {aid for aid, _, _ in plan.segments if any(aid in pairs for pairs in self.pairs.values())})
        if not adapters:
            return self.base(hidden_nh, top_k_index, top_k_weights)
        if self.routing.real_rows() is not None:
            top_k_index = top_k_index.masked_fill(~self.routing.real_tokens[:, None], self.num_experts)  # dropped
        slots = [(None, False)] + [(aid, aid in plan.trainable) for aid in adapters]
        token_slot = token_adapter_slots(plan, {aid: i + 1 for i, aid in enumerate(adapters)}, len(hidden_nh),
                                         hidden_nh.device)
        return self.grouped(hidden_nh, top_k_index, top_k_weights, token_slot, slots)

    def adapter_ids(self) -> list[str]:
        """Adapters with LoRA on these experts (sorted)."""
        return sorted({aid for pairs in self.pairs.values() for aid in pairs})

    def grouped(self, hidden_nh: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                token_slot: torch.Tensor, slots: list[AdapterSlotKey], out_nh: torch.Tensor | None = None) -> torch.Tensor:
        """Sort token choices by (expert, slot); run each local expert on its tokens, adding
        each slot's adapter LoRA (detached unless the slot trains) on its contiguous share.
        `token_slot` gives each token's index into `slots`; the result is added to `out_nh`
        (default zeros)."""
        num_tokens, top_k = top_k_index.shape
        token_c = torch.arange(num_tokens, device=hidden_nh.device).repeat_interleave(top_k)
        choice_c = top_k_index.reshape(-1)
        key_c = choice_c * len(slots) + token_slot[token_c]
        order = torch.argsort(key_c, stable=True)
        sizes = torch.bincount(key_c, minlength=(self.num_experts + 1) * len(slots)).tolist()
        out_nh = torch.zeros_like(hidden_nh) if out_nh is None else out_nh
        bounds = [0]
        for group_sizes in (sizes[e * len(slots) : (e + 1) * len(slots)] for e in range(self.num_experts)):
            bounds.append(bounds[-1] + sum(group_sizes))
        for expert in self.local_experts:  # index num_experts (if any) marks a dropped choice
            picked = order[bounds[expert] : bounds[expert + 1]]
            if len(picked):
                group_sizes = sizes[expert * len(slots) : (expert + 1) * len(slots)]
                groups = [(slots[s], n) for s, n in enumerate(group_sizes) if n]
                tokens = token_c[picked]
                weights = top_k_weights.reshape(-1)[picked]
                y = self._expert(expert, groups, hidden_nh[tokens]) * weights[:, None]
                out_nh.index_add_(0, tokens, y.to(out_nh.dtype))
        return out_nh

    def _expert(self, expert: int, groups: ExpertGroups, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._project("gate_up_proj", expert, groups, x)
        return self._project("down_proj", expert, groups, self._gate(gate_up))

    def _gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        apply_gate = getattr(self.base, "_apply_gate", None)
        if apply_gate is not None:
            return apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.base.act_fn(gate) * up

    def _project(self, param: str, expert: int, groups: ExpertGroups, x: torch.Tensor) -> torch.Tensor:
        """x @ W_e.T, plus scale * x @ A_e.T @ B_e.T on each adapter's share of the rows."""
        out = F.linear(x, getattr(self.base, param)[expert - self.local_experts.start])
        pairs = self.pairs[param]
        if not any(aid in pairs for (aid, _), _ in groups):
            return out
        counts = [count for _, count in groups]
        pieces = []
        for ((aid, trains), _), piece, x_g in zip(groups, torch.split(out, counts), torch.split(x, counts)):
            pair = pairs.get(aid)
            if pair is not None:
                a, b = pair.expert_factors(expert, detach=not trains)
                piece = piece + (F.linear(F.linear(x_g.to(a.dtype), a), b) * pair.scale).to(piece.dtype)
            pieces.append(piece)
        return torch.cat(pieces)


def token_adapter_slots(plan: RowPlan | None, slot_of: dict[str, int], num_tokens: int,
                        device: torch.device, trainable_offset: bool = False) -> torch.Tensor:
    """Each token's slot: `slot_of[adapter]` for tokens of rows whose adapter is listed
    (plus 1 if `trainable_offset` and the adapter trains in `plan`), else 0. The tokens
    are the plan's rows one after another (the MoE block flattens (rows, seq))."""
    token_slot = torch.zeros(num_tokens, dtype=torch.long, device=device)
    if plan is None or not plan.num_rows:
        return token_slot
    per_row = num_tokens // plan.num_rows
    for aid, start, end in plan.segments:
        if aid in slot_of:
            extra = int(trainable_offset and aid in plan.trainable)
            token_slot[start * per_row : end * per_row] = slot_of[aid] + extra
    return token_slot


def expert_targets(model: nn.Module) -> list[str]:
    """Names of the fused experts modules MultiLoraExperts supports: 3-D gate_up_proj and
    down_proj, concatenated [gate; up], not transposed, no bias (Qwen3-MoE, Mixtral)."""
    found = []
    for name, module in model.named_modules():
        weights = [getattr(module, p, None) for p in EXPERT_PARAMETERS]
        if not all(isinstance(w, nn.Parameter) and len(full_shape(w)) == 3 for w in weights):
            continue
        layout = (getattr(module, "has_gate", True), getattr(module, "has_bias", False),
                  getattr(module, "is_transposed", False), getattr(module, "is_concatenated", True))
        if layout == (True, False, False, True) and hasattr(module, "act_fn"):
            found.append(name)
    return found


def install_expert_wrappers(
    model: nn.Module, names: list[str], routing: LoraRouting
) -> dict[str, MultiLoraExperts]:
    """Replace each named experts module by a MultiLoraExperts sharing `routing`."""
    return {name: _replace(model, name, lambda base: MultiLoraExperts(base, routing)) for name in names}
