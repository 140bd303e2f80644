"""The ``curvkit`` command: thin — it parses, loads the user's objects, calls the API and prints.

Bad input (a module that does not import, checkpoint keys that do not match or a file that is
not a torch.save checkpoint, data of the wrong type, CUDA asked for but absent, an unknown
loss, an unwritable output folder, a NaN loss) is a
:class:`~curvkit.errors.CurvkitError`: one line on stderr, exit code 2, no traceback unless
``--debug``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import ArgumentError, CurvkitError, DataError, LossError, ModelError

app = typer.Typer(add_completion=False, rich_markup_mode=None,
                  help="curvkit: curvature of PyTorch models without forming a matrix.")

LOSSES = ("cross_entropy", "mse", "bce")
EXAMPLES = """\b
Examples:
  curvkit analyze                                   # the embedded default: a CNN on real digits
  curvkit analyze --fast --out /tmp/report          # smaller, quicker configuration
  curvkit analyze --model mypkg.models:build --data mypkg.data:val_batches \\
                  --checkpoint model.pt --loss cross_entropy --k 20 --out report/
  curvkit analyze --model ./net.py:make_net --data ./net.py:batches --params 'fc|head'
  torchrun --nproc-per-node 2 -m curvkit analyze --fast   # one shard per process, report by rank 0
\b
--model and --data name a callable as module:function (a dotted module on the Python path or
the current folder, or a path/to/file.py); it is called with no arguments. --data may return one
(inputs, targets) batch, a list of them or a DataLoader (iterated in order; use shuffle=False).
Writes report.json (schema: curvkit/analyze/report.schema.json), report.md, spectrum.png and
layers.png to --out. Bad input exits with code 2 and one line on stderr.
Under torchrun (WORLD_SIZE > 1) batch i goes to rank i % world, every product is summed over
the ranks (gloo on CPU, nccl with --device cuda), and rank 0 alone writes and prints the report.
"""


def _version_callback(value: bool) -> None:
    if value:
        import platform

        import torch

        from . import __version__

        typer.echo(f"curvkit {__version__} (torch {torch.__version__}, python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print curvkit's version and exit."),
) -> None:
    """curvkit: curvature of PyTorch models without forming a matrix."""


@app.command(epilog=EXAMPLES)
def analyze(
    model: Optional[str] = typer.Option(None, help="module:function returning an nn.Module (default: the embedded CNN on digits)."),
    data: Optional[str] = typer.Option(None, help="module:function returning a batch, a list of batches or a DataLoader."),
    loss: str = typer.Option("cross_entropy", help="cross_entropy | mse | bce (with logits) | module:function."),
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict to load into the model (torch.load, weights_only=True)."),
    unsafe_pickle: bool = typer.Option(False, "--unsafe-pickle", help="Allow a checkpoint that needs full unpickling (runs code from the file: only for files you trust)."),
    params: Optional[str] = typer.Option(None, help="Regex: analyse only the parameters whose names match."),
    k: int = typer.Option(12, help="Number of top eigenvalues (Hessian and GGN); more than the classes to count outliers."),
    probes: int = typer.Option(30, help="Hutch++ probes per trace (full and per layer)."),
    batches: Optional[int] = typer.Option(None, help="Use at most this many batches of the data."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    dtype: str = typer.Option("float32", help="float32 | float64"),
    seed: int = typer.Option(0, help="Seed of every random choice (training of the default, probes, starting vectors)."),
    out: Path = typer.Option(Path("curvkit-report"), help="Output folder."),
    threads: int = typer.Option(0, help=(
        "CPU threads (0: torch's choice for --model; the embedded default uses 1). Small models are fastest "
        "on 1 thread: their products are too small to gain from more, and on a busy machine extra threads "
        "only contend (the README's quick start: 28 s at 1 thread, 79-441 s at 2 on a loaded 2-core "
        "machine). Pass --threads 1 for small models; in Python, torch.set_num_threads(1).")),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no summary."),
    fast: bool = typer.Option(False, "--fast", help="A smaller, quicker configuration of the same computation (for tests)."),
    condition: bool = typer.Option(False, "--condition", help="Also the GGN's condition number (a lower bound; one more Lanczos run)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """A curvature report of a model on its data: top eigenvalues of the Hessian and the GGN,
    trace, spectral density, per-layer sensitivities, gradient/top-subspace overlap; with plots."""
    with _one_line_errors(debug):
        _analyze(model, data, loss, checkpoint, unsafe_pickle, params, k, probes, batches, device, dtype,
                 seed, out, threads, quiet, fast, debug, condition)


INFLUENCE_EXAMPLES = """\b
Examples:
  curvkit influence                                 # the default: digits CNN, 10% of its labels flipped
  curvkit influence --fast --method identity --out /tmp/inf
  curvkit influence --model mypkg.models:build --data mypkg.data:train_batches \\
                    --query mypkg.data:test_batch --checkpoint model.pt --damping 1e-3 --k 10
\b
--model, --data, --query, --loss and --checkpoint as for `curvkit analyze`; --data is the training
set (iterated in order: its positions are the training indices), --query the examples to explain
(default: the first 8 examples of --data). Writes influence.json, influence.md, self_influence.png
and, for image inputs, top_examples.png to --out. Bad input exits with code 2 and one line on stderr.
"""


@app.command(epilog=INFLUENCE_EXAMPLES)
def influence(
    model: Optional[str] = typer.Option(None, help="module:function returning an nn.Module (default: the embedded CNN on digits with 10% of its labels flipped)."),
    data: Optional[str] = typer.Option(None, help="module:function returning the training batches (a batch, a list of batches or a DataLoader, unshuffled)."),
    query: Optional[str] = typer.Option(None, help="module:function returning the query batches (default: held-out digits for the default, else the first 8 examples of --data)."),
    loss: str = typer.Option("cross_entropy", help="cross_entropy | mse | bce (with logits) | module:function."),
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict to load into the model (torch.load, weights_only=True)."),
    unsafe_pickle: bool = typer.Option(False, "--unsafe-pickle", help="Allow a checkpoint that needs full unpickling (only for files you trust)."),
    method: str = typer.Option("ekfac", help="ekfac (EK-FAC inverse GGN) | identity (plain gradient dot products)."),
    damping: float = typer.Option(1e-3, help="Added to the curvature's diagonal (>= 0; ekfac only)."),
    k: int = typer.Option(5, help="Helpful and harmful training examples listed per query."),
    batches: Optional[int] = typer.Option(None, help="Use at most this many batches of --data."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    dtype: str = typer.Option("float32", help="float32 | float64"),
    seed: int = typer.Option(0, help="Seed of the default's label flips, split and training."),
    out: Path = typer.Option(Path("curvkit-influence"), help="Output folder."),
    threads: int = typer.Option(0, help="CPU threads (0: torch's choice for --model; the embedded default uses 1)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no summary."),
    fast: bool = typer.Option(False, "--fast", help="A smaller, quicker configuration of the default (for tests)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Which training examples made these predictions: per query the top-k helpful and harmful
    training examples, and the self-influence ranking that finds mislabeled data; with plots."""
    with _one_line_errors(debug):
        _influence(model, data, query, loss, checkpoint, unsafe_pickle, method, damping, k, batches, device, dtype,
                   seed, out, threads, quiet, fast, debug)


COMPRESS_EXAMPLES = """\b
Examples:
  curvkit compress                                  # the default: HAWQ bits for the digits CNN at uniform-4-bit size
  curvkit compress --method hawq --bits 2,4,8 --size-budget 3kB --out plan/
  curvkit compress --method obs --sparsity 0.7                  # SparseGPT/OBS pruning, weights updated
  curvkit compress --method obs --pattern 2:4
  curvkit compress --method oba --pattern channel --sparsity 0.25   # a smaller architecture
  curvkit compress --method gptq --bits 4 --group-size 32 --format pt
  curvkit compress --model mypkg.models:build --data mypkg.data:calib --heldout mypkg.data:val \\
                   --checkpoint model.pt --method gptq --bits 3
\b
--model, --data, --loss and --checkpoint as for `curvkit analyze`; --data is the calibration data
(sensitivities, layer Hessians), --heldout what the result is measured on (default: the held-out
split of the default problem, else --data). Methods: hawq (mixed-precision bits: a plan, its Pareto
frontier and pareto.png), magnitude | obs | mfac | oba (pruning; oba needs a structured --pattern),
gptq | rtn (weight quantization). Writes compress.json, compress.md, a plot and, for pruning and
quantization, the compressed state_dict (model.safetensors or model.pt, plus model.structure.json for a
structured pattern: rebuild the architecture with curvkit.compress.PruneResult.rebuild or
curvkit.compress.apply_structure). Bad input exits with code 2 and one line on stderr.
"""


@app.command(epilog=COMPRESS_EXAMPLES)
def compress(
    method: str = typer.Option("hawq", help="hawq | magnitude | obs | mfac | oba | gptq | rtn."),
    model: Optional[str] = typer.Option(None, help="module:function returning an nn.Module (default: the embedded CNN on digits)."),
    data: Optional[str] = typer.Option(None, help="module:function returning the calibration batches."),
    heldout: Optional[str] = typer.Option(None, help="module:function returning the batches to measure on (default: --data)."),
    loss: str = typer.Option("cross_entropy", help="cross_entropy | mse | bce (with logits) | module:function."),
    checkpoint: Optional[Path] = typer.Option(None, help="state_dict to load into the model (torch.load, weights_only=True)."),
    unsafe_pickle: bool = typer.Option(False, "--unsafe-pickle", help="Allow a checkpoint that needs full unpickling (only for files you trust)."),
    params: Optional[str] = typer.Option(None, help="Regex: compress only the layers whose parameter names match."),
    bits: str = typer.Option("", help="hawq: the widths to choose from (default 2,4,8); gptq/rtn: one width (default 4)."),
    size_budget: Optional[str] = typer.Option(None, help="hawq: bytes (20000, 20kB, 1.5MB) or NBIT, the size of uniform N-bit weights (default: the median width)."),
    loss_budget: Optional[float] = typer.Option(None, help="hawq: the predicted loss increase allowed instead of a size (smallest plan under it)."),
    sparsity: Optional[float] = typer.Option(None, help="Pruning: the fraction removed, in [0, 1) (default 0.5; an n:m pattern fixes it)."),
    pattern: str = typer.Option("unstructured", help="Pruning: unstructured | N:M (e.g. 2:4) | channel | neuron | head."),
    scope: Optional[str] = typer.Option(None, help="Pruning: layer (each layer loses --sparsity) | global (over all layers)."),
    steps: int = typer.Option(1, help="Structured pruning: remove the groups in this many rounds, re-scoring the rest each round (cost x steps)."),
    group_size: Optional[int] = typer.Option(None, help="gptq/rtn: one scale per this many input columns (default: per row)."),
    damping: str = typer.Option("auto", help="obs/gptq: auto (the smallest of 0.01, 0.1, ... x mean diag H that factors) or a number."),
    batches: Optional[int] = typer.Option(None, help="Use at most this many batches of --data."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    dtype: str = typer.Option("float32", help="float32 | float64"),
    checkpoint_format: str = typer.Option("safetensors", "--format", help="safetensors | pt: how the compressed state_dict is written."),
    seed: int = typer.Option(0, help="Seed of the default's training and of every random choice."),
    out: Path = typer.Option(Path("curvkit-compress"), help="Output folder."),
    threads: int = typer.Option(0, help="CPU threads (0: torch's choice for --model; the embedded default uses 1)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no summary."),
    fast: bool = typer.Option(False, "--fast", help="A smaller, quicker configuration of the default (for tests)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Compress a model with its curvature: HAWQ mixed-precision bits, OBS/M-FAC/OBA pruning or GPTQ
    quantization; measured on held-out data, with the plan or the compressed checkpoint."""
    with _one_line_errors(debug):
        _compress(method, model, data, heldout, loss, checkpoint, unsafe_pickle, params, bits, size_budget,
                  loss_budget, sparsity, pattern, scope, steps, group_size, damping, batches, device, dtype,
                  checkpoint_format, seed, out, threads, quiet, fast, debug)


class _one_line_errors:
    """A CurvkitError becomes one line on stderr and exit code 2 (its traceback with ``--debug``)."""

    def __init__(self, debug: bool):
        self.debug = debug

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> bool:
        if e is None or self.debug or not isinstance(e, CurvkitError):
            return False
        msg = " ".join(str(e).split())  # one line, whatever the message held
        typer.echo(f"curvkit: error: {msg}", err=True)
        raise typer.Exit(2) from None


@app.command()
def experiment(
    name: str = typer.Argument(..., help="An experiment name, or 'all' (see the list below)."),
    out: Path = typer.Option(Path("curvkit-experiments"), help="Output folder for NAME.png and NAME.json."),
    quick: bool = typer.Option(False, "--quick", help="A reduced size (seconds; for tests), not the criterion's setting."),
    seed: int = typer.Option(0, help="Seed of the initial weights, batches and probes."),
    threads: int = typer.Option(1, help="CPU threads (1: small models are fastest on one)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Reproduce a phenomenon of curvature during training on real digits (a plot and a JSON with
    its criterion and PASS/FAIL): edge_of_stability, adam_edge_of_stability, progressive_sharpening,
    gradient_subspace, class_outliers, mup_width, batch_size_lr, or all. Exit code 1 if one FAILs."""
    import torch

    from .science import run

    with _one_line_errors(debug):
        if threads > 0:
            torch.set_num_threads(threads)
        results = run(name, out, quick=quick, seed=seed)
    for r in results:
        typer.echo(f"{r['result']}  {r['experiment']:<24} {r['seconds']:>6.1f} s  {out / (r['experiment'] + '.json')}")
    if any(r["result"] != "PASS" for r in results):
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``curvkit``, ``python -m curvkit``)."""
    app(args=argv, prog_name="curvkit")


# ----------------------------------------------------------------------------------------------
def _analyze(model_spec, data_spec, loss_spec, checkpoint, unsafe_pickle, params, k, probes, batches, device,
             dtype, seed, out, threads, quiet, fast, debug, condition=False) -> None:
    import time

    import torch

    t0 = time.perf_counter()
    warnings.formatwarning = lambda m, c, *a, **kw: f"curvkit: warning: {' '.join(str(m).split())}\n"
    _check_device_dtype(device, dtype)
    _check_user_specs(model_spec, data_spec, checkpoint, batches, "analyse")
    loss_fn = _loss(loss_spec, debug)
    ranks = _Ranks.start(device)  # under torchrun: the process group, this rank and the world size
    try:
        _run(ranks, model_spec, data_spec, loss_fn, checkpoint, unsafe_pickle, params, k, probes, batches,
             ranks.device, dtype, seed, out, threads, quiet, fast, debug, t0, condition)
    finally:
        ranks.stop()


def _run(ranks, model_spec, data_spec, loss_fn, checkpoint, unsafe_pickle, params, k, probes, batches, device,
         dtype, seed, out, threads, quiet, fast, debug, t0, condition=False) -> None:
    import time

    import torch

    from .analyze import analyze as run_analysis
    from .analyze import default

    if ranks.world > 1:
        warnings.formatwarning = (lambda m, c, *a, **kw:
                                  f"curvkit: warning (rank {ranks.rank}): {' '.join(str(m).split())}\n")
    ranks.agree(_writable_problem(out) if ranks.rank == 0 else None, "rank 0 cannot write the report to --out")
    show = None if not quiet and ranks.rank == 0 else False
    torch_dtype = getattr(torch, dtype)
    heldout = None
    if model_spec is None:
        torch.set_num_threads(threads or 1)
        problem = default.build(seed=seed, fast=fast, batches=batches, progress=show)
        model, loss_fn, batch_list, heldout = problem.model, problem.loss_fn, problem.data, problem.heldout
        description = problem.description
    else:
        if threads:
            torch.set_num_threads(threads)
        model, batch_list, description = _user_problem(model_spec, data_spec, checkpoint, unsafe_pickle, batches, debug)
    model = model.to(device=device, dtype=torch_dtype)
    batch_list = [_move(b, device, torch_dtype) for b in batch_list]
    heldout = _move(heldout, device, torch_dtype) if heldout is not None else None
    if ranks.world > 1:
        batch_list, heldout = ranks.shard(batch_list, heldout)
        ranks.same_weights(model)
        description += f"; {ranks.world} processes (torch.distributed), batch i on rank i % {ranks.world}"
    sizes = dict(k=k, probes=probes, condition=condition)
    if fast:
        sizes.update(probes=min(probes, 12), density_probes=3, density_iterations=30, max_matvecs=200)
    report = run_analysis(
        model, loss_fn, batch_list, params=params, heldout=heldout, seed=seed, progress=show,
        description=description,
        settings={"command": "curvkit " + " ".join(sys.argv[1:]), "fast": fast, "world_size": ranks.world},
        **sizes,
    )
    try:
        report.save(out)  # rank 0 only: on the other ranks it writes nothing
    except OSError as e:
        raise ArgumentError(f"--out {out}: cannot write the report there ({e.strerror or e})") from e
    if not quiet and ranks.rank == 0:
        h, tr, o = report.hessian, report.trace, report.outliers
        acc = report.accuracy["heldout"] if report.accuracy["heldout"] is not None else report.accuracy["data"]
        lines = [
            description,
            f"loss {report.loss['data']:.4g}" + (f", accuracy {acc:.1%}" if acc is not None else ""),
            f"top Hessian eigenvalue {h['values'][0]:.4g} (residual {h['residuals'][0]:.1e}), "
            f"trace {tr['value']:.4g} ± {tr['stderr']:.2g}, "
            f"{report.gradient['fraction_in_top_k']:.1%} of the gradient in the top-{k} eigenspace, "
            f"{o['count']} outlier eigenvalues for {o['num_classes'] or 'n/a'} classes",
            f"{report.cost['total_products']} products, {time.perf_counter() - t0:.1f}s in all",
            f"report written to {out}/ (report.md, report.json, spectrum.png, layers.png)",
        ]
        typer.echo("\n".join(lines))


def _check_device_dtype(device: str, dtype: str) -> None:
    """``--device`` (cpu, cuda, cuda:N with a GPU present) and ``--dtype`` (float32, float64)."""
    import torch

    if dtype not in ("float32", "float64"):
        raise ArgumentError(f"--dtype must be float32 or float64, got {dtype!r}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ArgumentError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError(
            f"--device {device}: CUDA is not available (torch {torch.__version__}"
            f"{' is a CPU-only build' if torch.version.cuda is None else ' sees no GPU'}); use --device cpu"
        )


def _check_user_specs(model_spec, data_spec, checkpoint, batches, verb: str) -> None:
    """The flags that go together: --data and --checkpoint with --model, --model with --data."""
    if batches is not None and batches < 1:
        raise ArgumentError(f"--batches must be >= 1, got {batches}")
    if (data_spec or checkpoint) and not model_spec:
        raise ArgumentError(f"--data and --checkpoint need --model (without them the embedded default is {verb}d)")
    if model_spec and not data_spec:
        raise ArgumentError(f"--model needs --data (a module:function returning the batches to {verb})")


def _user_problem(model_spec, data_spec, checkpoint, unsafe_pickle, batches, debug):
    """The user's model (its checkpoint loaded), their batches and a one-line description."""
    model = _model(model_spec, debug)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, unsafe_pickle)
    batch_list = _data(data_spec, batches, debug)
    description = f"{type(model).__name__} from {model_spec}" + (f", checkpoint {checkpoint}" if checkpoint else "")
    return model, batch_list, description


def _influence(model_spec, data_spec, query_spec, loss_spec, checkpoint, unsafe_pickle, method, damping, k,
               batches, device, dtype, seed, out, threads, quiet, fast, debug) -> None:
    import time

    import torch

    from .influence.base import check_damping
    from .influence.report import METHODS, influence_report

    t0 = time.perf_counter()
    warnings.formatwarning = lambda m, c, *a, **kw: f"curvkit: warning: {' '.join(str(m).split())}\n"
    if method not in METHODS:
        raise ArgumentError(f"--method must be one of {' | '.join(METHODS)}, got {method!r}")
    try:
        check_damping(damping)
    except ArgumentError as e:
        raise ArgumentError(f"--damping: {e}") from None
    if k < 1:
        raise ArgumentError(f"--k must be >= 1, got {k}")
    _check_device_dtype(device, dtype)
    _check_user_specs(model_spec, data_spec, checkpoint, batches, "use")
    if query_spec and not model_spec:
        raise ArgumentError("--query needs --model and --data (the default brings its own held-out queries)")
    loss_fn = _loss(loss_spec, debug)
    problem = _writable_problem(out)
    if problem:
        raise ArgumentError(problem)
    show = None if not quiet else False
    flipped = None
    if model_spec is None:
        from .influence import default

        torch.set_num_threads(threads or 1)
        d = default.build(seed=seed, fast=fast, progress=show)
        model, loss_fn, train, queries, flipped, description = d.model, d.loss_fn, d.data, [d.query], d.flipped, d.description
    else:
        if threads:
            torch.set_num_threads(threads)
        model, train, description = _user_problem(model_spec, data_spec, checkpoint, unsafe_pickle, batches, debug)
        if query_spec:
            queries = _data(query_spec, None, debug)
        else:
            x, y = train[0]
            from .model.data import map_tensors

            queries = [(map_tensors(lambda t: t[:8], x), y[:8])]
            description += "; queries: the first 8 training examples"
    torch_dtype = getattr(torch, dtype)
    model = model.to(device=device, dtype=torch_dtype)
    train = [_move(b, device, torch_dtype) for b in train]
    queries = [_move(b, device, torch_dtype) for b in queries]
    description += f"; {device}, {dtype}"
    report = influence_report(model, loss_fn, train, queries, method=method, damping=damping, k=k, flipped=flipped,
                              description=description,
                              settings={"command": "curvkit " + " ".join(sys.argv[1:]), "fast": fast, "seed": seed,
                                        "device": device, "dtype": dtype})
    try:
        paths = report.save(out)
    except OSError as e:
        raise ArgumentError(f"--out {out}: cannot write the report there ({e.strerror or e})") from e
    if not quiet:
        si = report.self_influence
        lines = [description,
                 f"{method}: {report.settings['n_query']} queries x {report.settings['n_train']} training examples; "
                 f"self-influence median {si['median']:.3g}, max {si['max']:.3g} (training index {si['top'][0]['index']})"]
        if report.mislabels is not None:
            m = report.mislabels
            lines.append(f"flipped labels found by inspecting the top 10% by self-influence: {m['found_top_10pct']:.0%}, "
                         f"top 20%: {m['found_top_20pct']:.0%}")
        lines.append(f"{time.perf_counter() - t0:.1f}s in all; report written to {out}/ "
                     f"({', '.join(p.name for p in paths)})")
        typer.echo("\n".join(lines))


def _compress(method, model_spec, data_spec, heldout_spec, loss_spec, checkpoint, unsafe_pickle, params, bits,
              size_budget, loss_budget, sparsity, pattern, scope, steps, group_size, damping, batches, device, dtype,
              checkpoint_format, seed, out, threads, quiet, fast, debug) -> None:
    import time

    import torch

    from .compress.report import BITS_METHODS, METHODS, compress_report

    t0 = time.perf_counter()
    warnings.formatwarning = lambda m, c, *a, **kw: f"curvkit: warning: {' '.join(str(m).split())}\n"
    if method not in METHODS:
        raise ArgumentError(f"--method must be one of {' | '.join(METHODS)}, got {method!r}")
    if checkpoint_format not in ("safetensors", "pt"):
        raise ArgumentError(f"--format must be safetensors or pt, got {checkpoint_format!r}")
    try:
        widths = tuple(int(b) for b in bits.replace(" ", "").split(",") if b) or ((2, 4, 8) if method in BITS_METHODS else (4,))
    except ValueError:
        raise ArgumentError(f"--bits must be integers separated by commas (e.g. 2,4,8), got {bits!r}") from None
    if method not in BITS_METHODS and len(widths) != 1:
        raise ArgumentError(f"--method {method} takes one width in --bits (e.g. --bits 4), got {bits!r}")
    try:
        damping_value: Any = damping if damping == "auto" else float(damping)
    except ValueError:
        raise ArgumentError(f"--damping must be auto or a number, got {damping!r}") from None
    _check_device_dtype(device, dtype)
    _check_user_specs(model_spec, data_spec, checkpoint, batches, "calibrate on")
    if heldout_spec and not model_spec:
        raise ArgumentError("--heldout needs --model and --data (the default brings its own held-out split)")
    loss_fn = _loss(loss_spec, debug)
    problem = _writable_problem(out)
    if problem:
        raise ArgumentError(problem)
    show = None if not quiet else False
    torch_dtype = getattr(torch, dtype)
    if model_spec is None:
        from .analyze import default

        torch.set_num_threads(threads or 1)
        d = default.build(seed=seed, fast=fast, batches=batches, progress=show)
        model, loss_fn, calib, held, description = d.model, d.loss_fn, d.data, [d.heldout], d.description
    else:
        if threads:
            torch.set_num_threads(threads)
        model, calib, description = _user_problem(model_spec, data_spec, checkpoint, unsafe_pickle, batches, debug)
        held = _data(heldout_spec, None, debug) if heldout_spec else calib
        if not heldout_spec:
            description += "; measured on --data (no --heldout given)"
    model = model.to(device=device, dtype=torch_dtype)
    calib = [_move(b, device, torch_dtype) for b in calib]
    held = [_move(b, device, torch_dtype) for b in held]
    report = compress_report(
        model, loss_fn, calib, held, method=method, bits=widths, size_budget=size_budget, loss_budget=loss_budget,
        sparsity=sparsity, pattern=pattern, scope=scope, group_size=group_size, damping=damping_value,
        params=params, steps=steps, seed=seed, progress=show, description=description,
        settings={"command": "curvkit " + " ".join(sys.argv[1:]), "fast": fast, "seed": seed, "device": device,
                  "dtype": dtype})
    try:
        paths = report.save(out, checkpoint_format)
    except OSError as e:
        raise ArgumentError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    if not quiet:
        b, a = report.before, report.after
        acc = (lambda d: "" if d["accuracy"] is None else f", accuracy {d['accuracy']:.1%}")
        typer.echo("\n".join([
            description,
            f"{method}: held-out loss {b['loss']:.4g}{acc(b)} -> {a['loss']:.4g}{acc(a)}; "
            f"size {report.size_before:,} -> {report.size_after:,.0f} bytes",
            f"{time.perf_counter() - t0:.1f}s in all; written to {out}/ ({', '.join(p.name for p in paths)})",
        ]))


def _writable_problem(out: Path) -> str | None:
    """Why the report cannot be written to ``out`` (None: it can); creates the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".curvkit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror or e}); choose another folder"
    return None


class _Ranks:
    """This process's place under ``torchrun`` (``WORLD_SIZE`` > 1): it starts the process group
    if nobody did (gloo on CPU, nccl for CUDA, one GPU per local rank). One process: rank 0 of 1."""

    def __init__(self, rank: int = 0, world: int = 1, device: str = "cpu", started: bool = False):
        self.rank, self.world, self.device, self.started = rank, world, device, started

    @classmethod
    def start(cls, device: str) -> _Ranks:
        import os

        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ArgumentError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; "
                                "run under torchrun, or unset it") from None
        if world <= 1:
            return cls(device=device)
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise ArgumentError(f"WORLD_SIZE={world} but this build of torch has no torch.distributed; "
                                "run one process")
        started = not dist.is_initialized()
        if device.startswith("cuda"):
            if device == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        if started:
            for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise ArgumentError(f"WORLD_SIZE={world} but {var} is not set; start the processes with "
                                        "torchrun (python -m torch.distributed.run --nproc-per-node N ...)")
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, started)

    def stop(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()

    def agree(self, problem: str | None, what: str) -> None:
        """Raise ``problem`` (found on this rank) here, and an error on every other rank."""
        if self.world > 1:
            import torch
            import torch.distributed as dist

            dev = self.device if self.device.startswith("cuda") else "cpu"
            flag = torch.tensor([1.0 if problem else 0.0], device=dev)
            dist.all_reduce(flag)
            if problem is None and float(flag) > 0:
                raise ArgumentError(f"{what} (see its error); every rank stops")
        if problem:
            raise ArgumentError(problem)

    def shard(self, batches: list, heldout):
        """Batch i to rank i % world; the held-out batch's rows likewise."""
        if len(batches) < self.world:
            raise ArgumentError(
                f"{len(batches)} batch{'es' if len(batches) != 1 else ''} for {self.world} processes: each "
                "process needs at least one (batch i goes to rank i % world); give more batches (--batches) "
                "or start fewer processes"
            )
        if heldout is not None:
            x, y = heldout
            heldout = (x[self.rank :: self.world], y[self.rank :: self.world])
        return batches[self.rank :: self.world], heldout

    def same_weights(self, model) -> None:
        """Every rank analyses rank 0's weights and buffers (an unseeded initialisation, say, differs)."""
        import torch.distributed as dist

        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def _load_attr(spec: str, flag: str) -> Any:
    """``module:attr`` or ``path/to/file.py:attr`` -> the attribute."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ArgumentError(f"{flag} {spec!r}: expected module:function (e.g. mypkg.models:build_model)")
    try:
        if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise ArgumentError(f"{flag} {spec!r}: cannot import {mod_name}: no such file")
            name = f"_curvkit_user_{path.stem}"
            module = sys.modules.get(name)
            if module is None or getattr(module, "__file__", None) != str(path.resolve()):
                s = importlib.util.spec_from_file_location(name, path.resolve())
                module = importlib.util.module_from_spec(s)
                sys.modules[name] = module
                s.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: modules in the current folder
            module = importlib.import_module(mod_name)
    except CurvkitError:
        raise
    except Exception as e:  # the user's module failing to import is bad input, whatever it raised
        raise ArgumentError(f"{flag} {spec!r}: cannot import module {mod_name!r}: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise ArgumentError(f"{flag} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _call(fn: Any, spec: str, flag: str, debug: bool) -> Any:
    if not callable(fn):
        raise ArgumentError(f"{flag} {spec!r} is a {type(fn).__name__}, not a callable")
    if debug:
        return fn()
    try:
        return fn()
    except Exception as e:
        raise ArgumentError(f"{flag} {spec!r}: calling it raised {type(e).__name__}: {e} (run with --debug for the traceback)") from e


def _model(spec: str, debug: bool):
    from torch import nn

    obj = _load_attr(spec, "--model")
    model = obj if isinstance(obj, nn.Module) else _call(obj, spec, "--model", debug)
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {spec!r} returned {type(model).__name__}; it must return a torch.nn.Module")
    return model


def _loss(spec: str, debug: bool):
    from torch import nn

    named = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
    if spec in named:
        return named[spec]()
    if ":" not in spec:
        raise LossError(f"--loss {spec!r}: unknown loss; use one of {', '.join(LOSSES)} or module:function")
    obj = _load_attr(spec, "--loss")
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return _call(obj, spec, "--loss", debug)
    if not callable(obj):
        raise LossError(f"--loss {spec!r} is a {type(obj).__name__}, not a callable loss(outputs, targets)")
    return obj


def _data(spec: str, limit: int | None, debug: bool) -> list:
    from torch import Tensor

    from .model.data import is_batch

    obj = _call(_load_attr(spec, "--data"), spec, "--data", debug)
    expected = "expected an (inputs, targets) batch, a list of them or a DataLoader"
    if is_batch(obj):
        return [tuple(obj)]
    if isinstance(obj, (str, bytes, dict, Tensor)) or not hasattr(obj, "__iter__"):
        raise DataError(f"--data {spec!r} returned {type(obj).__name__}; {expected}")
    out = []
    for i, b in enumerate(obj):
        if limit is not None and i >= limit:
            break
        if not is_batch(b):
            what = type(b).__name__ + (f" of length {len(b)}" if hasattr(b, "__len__") else "")
            raise DataError(f"--data {spec!r}: item {i} is a {what}, not an (inputs, targets) pair of tensors; {expected}")
        out.append(tuple(b))
    if not out:
        raise DataError(f"--data {spec!r} returned no batch")
    return out


def _move(batch, device: str, dtype) -> tuple:
    """The batch on ``device``, floating tensors in ``dtype``; inputs may be a nest of dicts, tuples
    and lists of tensors (a transformers-style batch)."""
    from .model.data import map_tensors

    def move(t):
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    x, y = batch
    return map_tensors(move, x), move(y)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a torch.save file in the pre-zip format


def _is_plain_pickle(path: Path) -> bool:
    """A pickle stream (``pickle.dump``) that is not a torch.save file: neither a zip archive nor
    torch's legacy format (a pickled magic number first). Reads the first opcodes only."""
    import io
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        return False
    with path.open("rb") as fh:
        head = fh.read(64)
    try:
        ops = pickletools.genops(io.BytesIO(head))
        first = next(ops)
        if first[0].name != "PROTO":  # protocol >= 2, as pickle.dump writes by default
            return False
        for op, arg, _ in ops:
            if op.name != "FRAME":
                return not (op.name in ("LONG1", "LONG4") and arg == _LEGACY_MAGIC)
    except (ValueError, StopIteration):  # not a pickle stream at all: torch.load will say so
        return False
    return False


def _load_checkpoint(model, path: Path, unsafe: bool) -> None:
    import pickle

    import torch
    from torch import nn

    if not path.is_file():
        raise ArgumentError(f"--checkpoint {path}: no such file")
    if _is_plain_pickle(path):
        raise ModelError(
            f"--checkpoint {path} is a plain pickle file (written by pickle.dump), not a torch.save "
            "checkpoint, so torch.load cannot read it, with or without --unsafe-pickle; save the weights "
            "with torch.save(model.state_dict(), 'model.pt') and pass that file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not unsafe:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"--checkpoint {path}: refused, it holds pickled Python objects that weights_only=True "
                f"will not load ({first}); pass --unsafe-pickle only if you trust the file, or save "
                "model.state_dict() instead"
            ) from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # the user trusted the file, but it still does not load
            raise ModelError(f"--checkpoint {path}: cannot be read by torch.load even with --unsafe-pickle "
                             f"({type(e2).__name__}: {e2}); save model.state_dict() with torch.save instead") from e2
    except Exception as e:
        raise ModelError(f"--checkpoint {path}: cannot be read by torch.load ({type(e).__name__}: {e})") from e
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ModelError(f"--checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"--checkpoint {path}: keys do not match the model: missing {missing or 'none'}; "
            f"unexpected {unexpected or 'none'}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"--checkpoint {path}: {' '.join(str(e).split())}") from e


if __name__ == "__main__":  # pragma: no cover
    main()
