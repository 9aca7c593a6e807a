"""Low-rank correction of the compression error (EoRA, Liu et al. 2024): W ≈ Q(W) + B·A, served as a LoRA adapter.

With the error E = W − Q(W) [out, in] and the Hessian of the linear's calibration inputs H = XᵀX = V Λ Vᵀ, the
output error left by a correction is ‖(E − BA)X‖² = ‖(E − BA) V Λ^½‖²_F. So the best rank-r B·A is the truncated
SVD of E V Λ^½ (Eckart–Young in the eigenspace the inputs live in), mapped back by Λ^−½ Vᵀ. Without activation
statistics (RTN, magnitude pruning) H = I: the plain SVD of E. Eigenvalues are floored at EIG_FLOOR·max, so
directions no calibration input takes are not blown up by Λ^−½.

On disk: a PEFT LoRA adapter in OUT/lowrank (`adapter_config.json`, `adapter_model.safetensors`) with
lora_alpha = r (scaling 1):
  base_model.model.<module>.lora_A.weight   fp16 [r, in]     A
  base_model.model.<module>.lora_B.weight   fp16 [out, r]    B      (both fp32 where a value does not fit fp16)
vLLM serves it with `--enable-lora --lora-modules corr=OUT/lowrank --max-lora-rank R'` (R' ≥ r, one of vLLM's
allowed ranks; `compress-export serve` sets all three); our loader, AutoCompressedModelForCausalLM and
transformers' from_pretrained through our backend apply it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from compress_export.core.errors import UserError
from compress_export.io import model_io, safety
from compress_export.io.model_io import _st_clean, _st_show

ADAPTER_DIR = "lowrank"
ADAPTER_NAME = "corr"  # the LoRA name `compress-export serve` registers
EIG_FLOOR = 1e-6
PREFIX = "base_model.model."
_FACTOR = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")  # the names save_adapter writes
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


@torch.no_grad()
def hessian_basis(H: Optional[torch.Tensor]):
    """(V, Λ^½ floored) of the inputs' Hessian H = V Λ Vᵀ, or None for H None (identity). Computed once for the
    linears that share an input (q/k/v, gate/up)."""
    if H is None:
        return None
    Hs = H.double()
    lam, V = torch.linalg.eigh((Hs + Hs.T) / 2)
    return V, lam.clamp(min=float(lam.max().clamp(min=0)) * EIG_FLOOR).clamp(min=1e-30).sqrt()


@torch.no_grad()
def lowrank_correction(error: torch.Tensor, H, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) in float32 minimising ‖(error − B·A)X‖² for inputs with Hessian H (a tensor, its
    hessian_basis, or None for the identity). The singular values are split evenly between B and A (√σ each) so
    neither factor carries all the scale."""
    E = error.double()
    basis = hessian_basis(H) if torch.is_tensor(H) else H
    if basis is None:
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    else:
        V, root = (t.to(E.device) for t in basis)
        U, S, Vh = torch.linalg.svd((E @ V) * root, full_matrices=False)
        Vh = (Vh / root) @ V.T
    r = min(rank, S.numel())
    half = S[:r].sqrt()
    return (half[:, None] * Vh[:r]).float(), (U[:, :r] * half).float()


def check_rank(rank: int, layout) -> None:
    """Before any weight: the rank fits every compressed linear, and vLLM can serve it."""
    if rank <= 0:
        return
    if rank > VLLM_RANKS[-1]:
        raise UserError(f"--lowrank-rank {rank}: vLLM serves LoRA ranks up to {VLLM_RANKS[-1]}; use a smaller rank")
    for i, lin in enumerate(layout.linears):
        for name, m in lin:
            if rank > min(m.in_features, m.out_features):
                raise UserError(
                    f"--lowrank-rank {rank} exceeds {layout.full_name(i, name)} "
                    f"[{m.out_features}×{m.in_features}]: use at most {min(m.in_features, m.out_features)}"
                )


def storage_dtype(A: torch.Tensor, B: torch.Tensor) -> torch.dtype:
    """fp16 (half the bytes, finer than bf16 at these magnitudes) unless a value would overflow it."""
    big = max(float(A.abs().max()), float(B.abs().max()))
    return torch.float16 if big < 6e4 else torch.float32


def save_adapter(
    folder: Path, factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]], rank: int, base_name: str
) -> Path:
    """The PEFT LoRA adapter of `factors` {module name: (A, B)} in `folder` (inside the export being written)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in sorted(factors.items()):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    # readable like the rest of the export (save_file left it 0600 here)
    (folder / "adapter_model.safetensors").chmod(0o644)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted({n.rpartition(".")[2] for n in factors}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_name,
        "compress_export": {"what": "low-rank correction of the quantization error (EoRA)"},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """(module, "A" or "B") of an adapter tensor name, or None when it is not a LoRA factor's name."""
    m = _FACTOR.fullmatch(key)
    return (m.group(1), m.group(2)) if m else None


def adapter_config(folder: Path) -> dict:
    """adapter_config.json of the adapter in `folder`, checked: r an int >= 1, lora_alpha a
    finite number, target_modules names. A stranger's file: every fault is one UserError naming file and field."""
    p = Path(folder) / "adapter_config.json"
    if not p.is_file():
        raise UserError(f"{p} is missing: a LoRA adapter needs it; write or download the export again")
    try:
        cfg = safety.read_json(p)
    except OSError as e:
        raise UserError(f"{p} cannot be read ({_st_clean(e)}); check the file and its permissions") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p} is {_st_show(cfg)}, not a JSON object of adapter settings")

    def bad(key, why):
        return UserError(f"{p}: {key} is {_st_show(cfg.get(key))}, {why}; write or download the export again")

    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad("r", "not a rank (an integer >= 1)")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise bad("lora_alpha", "not a number")
    targets = cfg.get("target_modules")
    if (
        targets is not None
        and not isinstance(targets, str)
        and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise bad("target_modules", "not a module name or a list of them")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):  # per-module ranks or scalings: read_adapter applies one r and one lora_alpha
            raise bad(key, "not applied here (one rank and one scaling for every module)")
    return cfg


def read_adapter(folder: Path) -> Tuple[dict, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config, {module name: (A, B) as stored}) of a LoRA adapter, with the scaling folded into B. The
    config, the header and every value are checked (NaN or Inf would make every output NaN)."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = adapter_config(folder)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("fan_in_fan_out"):
        raise UserError(
            f"{folder / 'adapter_config.json'}: only plain LoRA adapters are applied (peft_type LORA, "
            "no DoRA, no fan_in_fan_out)"
        )
    r = cfg["r"]
    scaling = float(cfg.get("lora_alpha", r)) / r
    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        raise UserError(f"{folder} has no adapter_model.safetensors; write or download the export again")
    model_io.safetensors_header(f)  # a damaged file is one line naming it, never safetensors' own error
    pairs: Dict[str, dict] = {}
    with safe_open(str(f), framework="pt") as fh:
        for k in fh.keys():
            key = split_key(k)
            if key is None:
                raise UserError(f"{f}: {_st_clean(k)} is not a LoRA factor name ({PREFIX}<module>.lora_A.weight)")
            t = fh.get_tensor(k)
            if t.dim() != 2 or t.shape[0 if key[1] == "A" else 1] != r or not t.is_floating_point():
                raise UserError(
                    f"{f}: {_st_clean(k)} is {str(t.dtype)[6:]} {list(t.shape)}, not a rank-{r} LoRA "
                    "factor; write or download the export again"
                )
            if not bool(torch.isfinite(t).all()):  # one NaN would make every output of the model NaN
                raise UserError(f"{f}: tensor {_st_clean(k)} has NaN or Inf; write or download the export again")
            pairs.setdefault(key[0], {})[key[1]] = t
    factors = {}
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{f}: module {_st_clean(mod)} has {sorted(ab)} but a LoRA pair needs A and B")
        factors[mod] = (ab["A"], ab["B"] * scaling if scaling != 1 else ab["B"])
    return cfg, factors


def adapter_rank(folder: Path) -> Optional[int]:
    """The rank of the LoRA adapter in `folder` (an export's OUT/lowrank), or None when there is none."""
    if not (Path(folder) / "adapter_config.json").is_file():
        return None
    return adapter_config(folder)["r"]


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    fits = [r for r in VLLM_RANKS if r >= rank]
    if not fits:
        raise UserError(f"this adapter's rank {rank} is above the largest LoRA rank vLLM serves ({VLLM_RANKS[-1]})")
    return fits[0]


def apply_adapter(model: torch.nn.Module, folder: Path) -> int:
    """Add each pair's B·A to its module's output (forward hook: works on nn.Linear and on our QuantLinear, whose
    weights stay packed). Returns the number of modules corrected."""
    _, factors = read_adapter(folder)
    for name, (A, B) in factors.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{folder}: the adapter corrects {name}, which this model does not have") from None
        ref = next((t for t in [*mod.parameters(), *mod.buffers()] if t.is_floating_point()), None)
        dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.float32, torch.device("cpu"))
        first = not hasattr(mod, "lowrank_A")  # applying twice replaces the pair, never adds it twice
        mod.register_buffer("lowrank_A", A.to(device, dtype), persistent=False)
        mod.register_buffer("lowrank_B", B.to(device, dtype), persistent=False)
        if first:
            mod.register_forward_hook(_add_correction)
    return len(factors)


def _add_correction(mod, args, out):
    A, B = mod.lowrank_A, mod.lowrank_B
    x = args[0]
    if A.device != x.device:  # a module without weights of its own (a packed QuantLinear) moved with its kernel
        A, B = A.to(x.device), B.to(x.device)
    return out + (x.to(A.dtype) @ A.t() @ B.t()).to(out.dtype)
