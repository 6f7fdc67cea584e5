"""`torch.export` programs (`.pt2`): any architecture in a file that loads without running code from it.

A program's graph calls aten ops on its weights. `lift` turns it into a trainable module: every
`aten.conv2d` becomes an `nn.Conv2d` (named after its weight), every `aten.batch_norm` an `nn.BatchNorm`
(so fine-tuning updates its statistics) and every `aten.linear` an `nn.Linear`, holding the program's own
tensors. From there TRP and the decomposition see convs as in any model: replacing one by its low-rank
pair rewrites that node into the pair. Outputs are written back as programs, with trp-edge's spec in the
archive (`extra_files`) so a compressed program reloads with its pairs regrouped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import InputError

FAMILY = "export"
SPEC_FILE = "trp-edge.json"
aten = torch.ops.aten


class _BatchNorm(nn.BatchNorm2d):
    """A batch norm over dim 1 of any rank, as aten.batch_norm computes it."""

    def _check_input_dim(self, input):
        pass


def _holder(gm: nn.Module, attr: fx.Node, used: set[str]) -> str | None:
    """The submodule path owning a weight read by `attr`, when that submodule holds only what this op uses
    (so it can become the op's module), else None."""
    if attr.op != "get_attr" or not attr.target.endswith(".weight"):
        return None
    path = attr.target.rpartition(".")[0]
    owner = gm.get_submodule(path)
    own = {n for n, _ in owner.named_parameters(recurse=False)} | {n for n, _ in owner.named_buffers(recurse=False)}
    return path if not list(owner.children()) and own <= used else None


def _tensor(gm: nn.Module, node: fx.Node | None) -> torch.Tensor | None:
    """The parameter or buffer object a get_attr node reads (None for an absent optional argument)."""
    if node is None:
        return None
    path, _, attr = node.target.rpartition(".")
    return getattr(gm.get_submodule(path), attr)


def _args(node: fx.Node, names: tuple[str, ...], defaults: tuple) -> list:
    """An aten call's arguments by position, keyword or default."""
    return list(node.args) + [node.kwargs.get(n, d) for n, d in zip(names[len(node.args):], defaults[len(node.args):])]


def _weights(gm: nn.Module, w: fx.Node, b: fx.Node | None) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    """(owner path, weight, bias) of a conv or linear call whose weight owner can become its module, else None."""
    path = _holder(gm, w, {"weight", "bias"})
    if path is None or (b is not None and b.op != "get_attr"):
        return None
    return path, _tensor(gm, w), _tensor(gm, b)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv(gm, node) -> tuple[str, nn.Module] | None:
    _, w, b, stride, padding, dilation, groups = _args(node, _CONV_ARGS, (None, None, None, [1, 1], [0, 0], [1, 1], 1))
    found = _weights(gm, w, b)
    if found is None:
        return None
    path, weight, bias = found
    n, cg, kh, kw = weight.shape
    conv = nn.Conv2d(cg * groups, n, (kh, kw), stride, padding, dilation, groups, bias=bias is not None,
                     device="meta")
    conv.weight, conv.bias = weight, bias
    return path, conv


def _linear(gm, node) -> tuple[str, nn.Module] | None:
    _, w, b = _args(node, ("input", "weight", "bias"), (None, None, None))
    found = _weights(gm, w, b)
    if found is None:
        return None
    path, weight, bias = found
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight, lin.bias = weight, bias
    return path, lin


def _batch_norm(gm, node) -> tuple[str, nn.Module] | None:
    _, w, b, mean, _var, _training, momentum, eps = node.args[:8]
    if w is None or mean is None:
        return None
    path = _holder(gm, w, {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
    if path is None:
        return None
    owner, weight = gm.get_submodule(path), _tensor(gm, w)
    bn = _BatchNorm(weight.shape[0], eps, momentum, device="meta")
    bn.weight, bn.bias = weight, _tensor(gm, b)
    bn.running_mean, bn.running_var = owner.running_mean, owner.running_var
    if hasattr(owner, "num_batches_tracked"):
        bn.num_batches_tracked = owner.num_batches_tracked
    return path, bn


_LIFTS = {aten.conv2d.default: _conv, aten.conv2d.padding: _conv, aten.linear.default: _linear,
          aten.batch_norm.default: _batch_norm}


def lift(program) -> fx.GraphModule:
    """A trainable module computing the program, with its convs, batch norms and linears as modules."""
    gm = program.module()
    for name in ("train", "eval"):  # export's module refuses mode changes; lifted, its modes mean what they say
        gm.__dict__.pop(name, None)
    graph = gm.graph
    for node in list(graph.nodes):
        lifted = _LIFTS.get(node.target) if node.op == "call_function" else None
        made = lifted(gm, node) if lifted else None
        if made is None:
            continue
        path, module = made
        gm.set_submodule(path, module)
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    gm.recompile()
    return gm


def input_shape(program) -> tuple[tuple[int, ...], int | None]:
    """The shape of the program's first input as exported (a free batch dimension read as 1), and its batch
    size when that is fixed (training then cannot batch)."""
    first = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
    shape = node.meta["val"].shape
    return tuple(d if isinstance(d, int) else 1 for d in shape), shape[0] if isinstance(shape[0], int) else None


def load(path: Path) -> tuple[fx.GraphModule, dict[str, Any] | None, tuple[int, ...], int | None]:
    """The lifted program in a .pt2 file, the trp-edge spec saved with it (None for a user's program), its input
    shape and its batch size when that is fixed."""
    extra = {SPEC_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - the deserializer raises many types
        raise InputError(f"{path}: not a loadable torch.export program ({str(e).splitlines()[0][:160]})") from e
    spec = json.loads(extra[SPEC_FILE]) if extra[SPEC_FILE] else None
    return (lift(program), spec, *input_shape(program))


def save(model: nn.Module, example: torch.Tensor, path: Path, spec: dict[str, Any]) -> None:
    """`model` as a torch.export program with a free batch dimension (or the fixed one of the program it came
    from), `spec` inside the archive."""
    fixed = spec["arch"].get("fixed_batch")  # a program exported at a fixed batch keeps it
    # batch 2 otherwise: a size-1 example would fix the batch to 1
    x = example.expand(fixed or 2, *example.shape[1:]).contiguous()
    was = model.training
    model.eval()
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=None if fixed else ({0: torch.export.Dim("batch")},))
    except Exception as e:  # noqa: BLE001 - export fails in many ways on data-dependent models
        raise InputError(f"torch.export of the model failed ({str(e).splitlines()[0][:200]}); such a model "
                         "cannot be written as a .pt2") from e
    finally:
        model.train(was)
    torch.export.save(program, str(path), extra_files={SPEC_FILE: json.dumps(spec)})


def regroup_(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Each decomposed layer's two lifted convs or linears (`NAME.first`, `NAME.second`) under one low-rank pair
    module at NAME, as the compressed model had them."""
    from ..lowrank import LowRankConv2d, LowRankLinear

    for name, layer in layers.items():
        first, second = model.get_submodule(f"{name}.first"), model.get_submodule(f"{name}.second")
        pair = LowRankLinear if isinstance(first, nn.Linear) else LowRankConv2d
        model.set_submodule(name, pair(first, second, layer["scheme"]))
