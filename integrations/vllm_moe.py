"""Our vLLM MoE method: a MoE layer's packed experts run on our kernel registry, one kernel per expert projection.

vLLM fuses a MoE layer's experts into one layer (RoutedExperts) and asks the quantization method for it. vLLM 0.32
on the CPU has a 4-bit MoE kernel only on AMX x86 and only for bf16 and group sizes other than 32 (and there it
crashed with SIGILL in our test VM), so wherever our plugin claims a checkpoint its MoE layers come here too.

Storage while loading: each tensor of the format (formats/*: `tensor_layout`) becomes one parameter over every local
expert, named as vLLM's expert mapping names it: `w13_<suffix>` [experts, 2, *shape] (gate at 1 = 0, up at 1 = 1,
each [inter, hidden] as a linear) and `w2_<suffix>` [experts, *shape] (down, [hidden, inter]). Our loader copies
each checkpoint tensor into its slot, checking its shape. After loading, every (expert, projection) is read back by
the format into a QuantizedWeight and handed to the kernel the registry chooses, and the packed copies are dropped.

Tensor parallelism: each rank holds its slice of every expert, taken from the full checkpoint tensors by our loader
as vLLM's own MoE loader would: gate/up along their outputs, down along its inputs (its groups renumbered from the
slice's first), along each tensor's axis in the format's layout; vLLM's runner all-reduces the partial outputs.
Packed words and groups must not straddle two ranks, and act-order experts are refused. Expert parallelism is not
supported (every rank holds every expert).

apply() runs the routing vLLM computed (top-k ids and weights) expert by expert: each expert once, on the tokens
routed to it, the output weighted and summed, as transformers' eager loop does. Shared experts are left to vLLM's
runner, which runs them itself when the method has no modular kernel.
"""

from __future__ import annotations

import torch

from compress_export.integrations.tp_plan import linear_problems
from compress_export.integrations.vllm_api import get as vllm_name
from compress_export.integrations.vllm_route import log
from compress_export.kernels.base import KernelRequest, choose_kernel

_GATED = {"silu": torch.nn.functional.silu}  # vLLM's MoEActivation value → the gate's activation


def make_moe_method(config, moe, prefix: str):
    """Our MoE method for `config` (CompressExportConfig), built as a subclass of vLLM's FusedMoEMethodBase."""
    return _method_class()(config, moe, prefix)


_CLASS: list = []


def _method_class():
    if _CLASS:
        return _CLASS[0]
    base = vllm_name("FusedMoEMethodBase")

    class CompressExportMoEMethod(_MoEMethod, base):  # type: ignore[misc, valid-type]
        def __init__(self, config, moe, prefix: str):
            base.__init__(self, moe)
            _MoEMethod.__init__(self, config, prefix)

    _CLASS.append(CompressExportMoEMethod)
    return CompressExportMoEMethod


class _MoEMethod:
    """The method's body (kept apart from vLLM's base class so importing this module imports no vLLM)."""

    def __init__(self, config, prefix: str):
        self.config, self.prefix = config, prefix
        self.experts: list = []  # per local expert: (gate, up, down) kernels, after loading
        self.moe = getattr(self, "moe", None)  # FusedMoEConfig, set by vLLM's base before this runs

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
    ):
        par = self.moe.moe_parallel_config
        if getattr(par, "ep_size", 1) != 1:
            raise ValueError(
                f"{self.prefix}: compress-export's MoE method holds every expert on each rank (expert-parallel "
                f"{par.ep_size}); serve this MoE export without --enable-expert-parallel"
            )
        self.tp, self.rank = getattr(par, "tp_size", 1), getattr(par, "tp_rank", 0)
        act = getattr(self.moe.activation, "value", str(self.moe.activation))
        if act not in _GATED or not getattr(self.moe, "is_act_and_mul", True):
            raise ValueError(f"{self.prefix}: compress-export's MoE method runs gated SiLU experts, not {act}")
        fmt, scheme, qcfg = self.config.fmt, self.config.scheme, self.config.qcfg
        if fmt.has_module_overrides(qcfg):
            raise ValueError(
                f"{self.prefix}: compress-export's MoE method runs one scheme for every expert, and this "
                "checkpoint has per-module overrides (mixed precision)"
            )
        hidden, inter = hidden_size, intermediate_size_per_partition
        if self.tp > 1 and scheme is not None and scheme.act_order == "group":
            raise ValueError(
                f"{self.prefix}: act-order experts' groups do not split {self.tp} ways (tensor-parallel): serve "
                "this MoE export with --tensor-parallel-size 1, or export it without act-order"
            )
        self.split: dict = {}  # parameter name → the axis a tensor-parallel rank takes its slice of (None: whole)
        for stem, (in_f, out_f), lead in (
            ("w13", (hidden, inter), (num_experts, 2)),
            ("w2", (inter, hidden), (num_experts,)),
        ):
            if scheme is not None and not scheme.divides(in_f):
                raise ValueError(f"{self.prefix}: group size {scheme.group_size} does not divide the experts' {in_f}")
            layout = fmt.tensor_layout(scheme, in_f, out_f, fmt.stored_dtype(qcfg))
            self.split.update(_split_axes(fmt, scheme, qcfg, stem, layout, (in_f, out_f), self.tp, self.prefix))
            for suffix, spec in layout.items():
                data = torch.zeros((*lead, *spec.shape), dtype=spec.dtype)
                if suffix.endswith("g_idx"):  # absent from some checkpoints: contiguous groups, unless act-order's
                    gs = in_f if scheme is None else scheme.group_len(in_f)  # (then -1 until the checkpoint's load)
                    act_order = scheme is not None and scheme.act_order == "group"
                    data[...] = -1 if act_order else torch.arange(in_f, dtype=spec.dtype) // gs
                param = torch.nn.Parameter(data, requires_grad=False)
                param.weight_loader = self._loader(layer)
                layer.register_parameter(f"{stem}_{suffix}", param)
        layer.ce_moe_names = [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(("w13_", "w2_"))]
        layer.ce_moe_shape = (num_experts, hidden, inter)
        layer.ce_moe_loaded = set()  # (parameter, local expert, shard) slots the checkpoint filled
        self.act_dtype = params_dtype

    def _loader(self, layer):
        names = {}  # id(parameter) → its name, filled on first use (the parameters are registered after this)

        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local < 0:
                return False if return_success else None
            slot = param.data[local] if shard_id == "w2" else param.data[local, 0 if shard_id == "w1" else 1]
            if self.tp > 1:
                if not names:
                    names.update({id(p): n for n, p in layer.named_parameters(recurse=False)})
                loaded_weight = self._shard(names[id(param)], loaded_weight, slot, weight_name)
            if tuple(slot.shape) != tuple(loaded_weight.shape):
                raise ValueError(
                    f"{weight_name} (expert {expert_id}, {shard_id}): the checkpoint holds shape "
                    f"{list(loaded_weight.shape)}, config.json implies {list(slot.shape)}"
                )
            slot.copy_(loaded_weight)
            layer.ce_moe_loaded.add((id(param), local, shard_id))
            return True if return_success else None

        return load

    def _shard(self, name: str, full: torch.Tensor, slot: torch.Tensor, weight_name: str) -> torch.Tensor:
        """This tensor-parallel rank's slice of one expert projection's checkpoint tensor: gate/up split along
        their outputs, down along its inputs (vLLM all-reduces the partial outputs), as vLLM's own MoE loader
        slices them. A down projection's group indices are renumbered from the slice's first group."""
        axis = self.split.get(name)
        if axis is None:
            return full
        size = slot.shape[axis]
        if full.shape[axis] != size * self.tp:
            raise ValueError(
                f"{weight_name}: holds {full.shape[axis]} along axis {axis}, not {self.tp} × {size} as config.json "
                "implies (tensor-parallel): re-export the checkpoint, or serve it with --tensor-parallel-size 1"
            )
        part = full.narrow(axis, size * self.rank, size)
        scheme = self.config.scheme
        if name.endswith("g_idx") and scheme is not None and scheme.group_size > 0:
            groups = -(-size // scheme.group_len(size))
            part = part - groups * self.rank
            if bool((part < 0).any() or (part >= groups).any()):
                raise ValueError(
                    f"{weight_name}: its groups do not split {self.tp} ways: serve with --tensor-parallel-size 1"
                )
        return part

    def get_fused_moe_quant_config(self, layer):
        return None

    def process_weights_after_loading(self, layer) -> None:
        fmt, qcfg = self.config.fmt, self.config.qcfg
        experts, hidden, inter = layer.ce_moe_shape
        _check_loaded(layer, self.prefix)
        params = {n: getattr(layer, n).data for n in layer.ce_moe_names}
        if any(bool((t < 0).any()) for n, t in params.items() if n.endswith("g_idx")):
            raise ValueError(f"{self.prefix}: the checkpoint's act-order experts lack their g_idx tensors")
        if params and next(iter(params.values())).device.type != "cpu" and not _eager():
            raise ValueError(
                f"{self.prefix}: compress-export's MoE method routes tokens expert by expert on the host, which CUDA "
                "graphs cannot capture: serve this MoE export with --enforce-eager"
            )
        names = ("gate", "up", "down")  # for messages and buffer names only
        kernels = []
        for e in range(experts):
            three = []
            for proj, (stem, idx), shape in zip(
                names, (("w13", 0), ("w13", 1), ("w2", None)), ((inter, hidden),) * 2 + ((hidden, inter),)
            ):
                tensors = {
                    n[len(stem) + 1 :]: (t[e] if idx is None else t[e, idx])
                    for n, t in params.items()
                    if n.startswith(stem + "_")
                }
                if "weight_shape" in tensors:  # compressed-tensors' record of the linear's [out, in]
                    tensors["weight_shape"] = torch.tensor(shape, dtype=tensors["weight_shape"].dtype)
                qw = fmt.read(f"{self.prefix}.{e}.{proj}", tensors, qcfg)
                req = KernelRequest.for_weight(qw, self.act_dtype, next(iter(tensors.values())).device.type)
                three.append(choose_kernel(req)(qw, req))
            kernels.append(tuple(three))
        for n in layer.ce_moe_names:  # the packed copies are no longer needed: each kernel holds its own
            delattr(layer, n)
        for e, ks in enumerate(kernels):
            for proj, k in zip(names, ks):
                for n, t in k.tensors().items():
                    layer.register_buffer(f"ce_{e}_{proj}_{n}", t, persistent=False)
        self.experts = kernels
        layer.ce_kernel_name = kernels[0][0].name if kernels else None
        log.info("compress-export plugin: %s runs %d experts on %s", self.prefix, experts, layer.ce_kernel_name)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        act = _GATED[getattr(self.moe.activation, "value", "silu")]
        out = torch.zeros_like(x)
        for e, (gate, up, down) in enumerate(self.experts):
            token, slot = torch.where(topk_ids == e)
            if token.numel() == 0:
                continue
            xs = x[token]
            y = down(act(gate(xs)) * up(xs)) * topk_weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _split_axes(fmt, scheme, qcfg, stem: str, layout: dict, local: tuple, tp: int, prefix: str) -> dict:
    """{parameter name: axis}: where each of a stem's tensors (w13: gate/up, column-parallel; w2: down,
    row-parallel) is sliced across `tp` ranks, in one expert projection's tensor (None: every rank holds it
    whole). Whether the projection splits at all is `check --tensor-parallel`'s own rule (tp_plan.linear_problems:
    no packed word or group may straddle two ranks), so the check and the server agree."""
    if tp == 1:
        return {}
    in_f, out_f = local
    full_in, full_out = (in_f, out_f * tp) if stem == "w13" else (in_f * tp, out_f)
    name = "experts.0.w2" if stem == "w2" else "experts.0.w1"  # ROW_PARALLEL names the down projection
    problems = linear_problems(fmt, scheme, name, full_in, full_out, tp, False)
    if problems:
        raise ValueError(
            f"{prefix}: the experts' {stem} does not split {tp} ways (packed words or groups would straddle two "
            f"ranks: {problems[0]}): serve with --tensor-parallel-size 1"
        )
    full = fmt.tensor_layout(scheme, full_in, full_out, fmt.stored_dtype(qcfg))
    out = {}
    for suffix, spec in layout.items():
        axis = spec.output_dim if stem == "w13" else spec.input_dim
        if axis is not None and spec.per_group and full[suffix].shape[axis] == spec.shape[axis]:
            axis = None  # one group over all the inputs (per-channel): every rank holds it whole
        out[f"{stem}_{suffix}"] = axis
    return out


def _check_loaded(layer, prefix: str) -> None:
    """Every expert's every packed tensor came from the checkpoint: vLLM counts a parameter as loaded by name, so
    an expert missing from the files would otherwise run on zeros. g_idx may be absent (contiguous groups)."""
    experts = layer.ce_moe_shape[0]
    for n in layer.ce_moe_names:
        if n.endswith("g_idx"):
            continue
        shards = ("w2",) if n.startswith("w2_") else ("w1", "w3")
        param = getattr(layer, n)
        lost = [(e, s) for e in range(experts) for s in shards if (id(param), e, s) not in layer.ce_moe_loaded]
        if lost:
            raise ValueError(
                f"{prefix}: the checkpoint lacks {n} for {len(lost)} expert projection(s) (e.g. expert {lost[0][0]}, "
                f"{lost[0][1]}); re-export it"
            )


def _eager() -> bool:
    vc = vllm_name("get_current_vllm_config")()
    return bool(getattr(getattr(vc, "model_config", None), "enforce_eager", False))
