"""Calibration grids written directly as .tflite flatbuffers (ai_edge_litert's schema, no converter): a layer's
dense conv and every low-rank pair of its grid, one subgraph and signature each, made in milliseconds where
litert-torch takes about 1.8 s per signature. Each variant is a chain of CONV_2D ops on an NHWC input, as the
converter lowers convs (SAME or VALID padding, a PAD before the conv for other paddings), run by XNNPACK as the
converted nets are. Weights are random: latency does not depend on them.

INT8 grids are full-integer: int8 activations (scale GRID_ACT_SCALE, zero point 0), per-channel int8 weights,
int32 bias, int8 input and output, as inside a quantized net."""

from __future__ import annotations

from typing import Any

import numpy as np

GRID_ACT_SCALE = 0.05


def _conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


class _Writer:
    """One model being written: operator codes and buffers shared by the subgraphs."""

    def __init__(self, int8: bool, seed: int):
        from ai_edge_litert import schema_py_generated as schema

        self.S, self.int8, self.rng = schema, int8, np.random.default_rng(seed)
        self.model = schema.ModelT()
        self.model.version, self.model.buffers = 3, [schema.BufferT()]
        self.model.subgraphs, self.model.signatureDefs, self.model.operatorCodes = [], [], []
        self.codes: dict[int, int] = {}
        self.act = schema.TensorType.INT8 if int8 else schema.TensorType.FLOAT32

    def opcode(self, op: int, version: int = 1) -> int:
        if op not in self.codes:
            c = self.S.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = op, min(op, 127), version
            self.codes[op] = len(self.model.operatorCodes)
            self.model.operatorCodes.append(c)
        return self.codes[op]

    def buffer(self, arr: np.ndarray) -> int:
        b = self.S.BufferT()
        b.data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), np.uint8)
        self.model.buffers.append(b)
        return len(self.model.buffers) - 1

    def quant(self, scale, zero) -> Any:
        q = self.S.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = list(map(float, scale)), list(map(int, zero)), 0
        return q

    def tensor(self, g, shape, ttype=None, buf: int = 0, q=None, name: str = "t") -> int:
        """A tensor of subgraph g (an activation by default: quantized in an INT8 grid)."""
        t = self.S.TensorT()
        t.shape, t.buffer, t.name = list(map(int, shape)), buf, name.encode()
        t.type = self.act if ttype is None else ttype
        if ttype is None and self.int8:
            q = self.quant([GRID_ACT_SCALE], [0])
        if q is not None:
            t.quantization = q
        g.tensors.append(t)
        return len(g.tensors) - 1

    def op(self, g, code: int, inputs: list[int], outputs: list[int], kind: int, options, version: int = 1) -> None:
        o = self.S.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.opcode(code, version), inputs, outputs
        o.builtinOptionsType, o.builtinOptions = kind, options
        g.operators.append(o)

    def call(self, g, x: int) -> int:
        """The per-call overhead: a 1-element SLICE of the input."""
        S = self.S
        begin = self.tensor(g, [4], S.TensorType.INT32, self.buffer(np.zeros(4, np.int32)), name="begin")
        size = self.tensor(g, [4], S.TensorType.INT32, self.buffer(np.ones(4, np.int32)), name="size")
        y = self.tensor(g, [1, 1, 1, 1], name="output_0")
        self.op(g, S.BuiltinOperator.SLICE, [x, begin, size], [y], S.BuiltinOptions.SliceOptions, S.SliceOptionsT())
        return y

    def conv(self, g, x: int, chw: tuple[int, int, int], cv: dict[str, Any], name: str):
        """CONV_2D (after a PAD when the padding is neither SAME nor VALID); returns (output, its C, H, W)."""
        S = self.S
        ch, hh, ww = chw
        (kh, kw), (sh, sw), (ph, pw), (dh, dw), oc = cv["k"], cv["s"], cv["p"], cv["d"], cv["out"]
        oh, ow = _conv_out(hh, kh, sh, ph, dh), _conv_out(ww, kw, sw, pw, dw)
        same = (oh, ow) == (-(-hh // sh), -(-ww // sw))
        valid = (oh, ow) == (_conv_out(hh, kh, sh, 0, dh), _conv_out(ww, kw, sw, 0, dw))
        if not same and not valid:
            pads = self.tensor(g, [4, 2], S.TensorType.INT32,
                               self.buffer(np.array([[0, 0], [ph, ph], [pw, pw], [0, 0]], np.int32)), name="pads")
            padded = self.tensor(g, [1, hh + 2 * ph, ww + 2 * pw, ch], name=f"pad-{name}")
            self.op(g, S.BuiltinOperator.PAD, [x, pads], [padded], S.BuiltinOptions.PadOptions, S.PadOptionsT())
            x, valid = padded, True
        wshape = (oc, kh, kw, ch)
        if self.int8:
            ws = np.full(oc, 0.01)
            w = self.tensor(g, wshape, S.TensorType.INT8, self.buffer(self.rng.integers(-127, 128, wshape, np.int8)),
                            self.quant(ws, np.zeros(oc)), name=f"w-{name}")
            b = self.tensor(g, [oc], S.TensorType.INT32, self.buffer(self.rng.integers(-999, 999, oc).astype(np.int32)),
                            self.quant(ws * GRID_ACT_SCALE, np.zeros(oc)), name=f"b-{name}")
        else:
            weights = (self.rng.standard_normal(wshape) * 0.1).astype(np.float32)
            w = self.tensor(g, wshape, S.TensorType.FLOAT32, self.buffer(weights), name=f"w-{name}")
            b = self.tensor(g, [oc], S.TensorType.FLOAT32, self.buffer(np.zeros(oc, np.float32)), name=f"b-{name}")
        y = self.tensor(g, [1, oh, ow, oc], name=name)
        opt = S.Conv2DOptionsT()
        opt.padding = S.Padding.VALID if valid else S.Padding.SAME
        opt.strideH, opt.strideW, opt.dilationHFactor, opt.dilationWFactor = sh, sw, dh, dw
        opt.fusedActivationFunction = S.ActivationFunctionType.NONE
        self.op(g, S.BuiltinOperator.CONV_2D, [x, w, b], [y], S.BuiltinOptions.Conv2DOptions, opt,
                version=3 if self.int8 else 1)
        return y, (oc, oh, ow)

    def subgraph(self, sig: str, input_shape: tuple[int, ...], convs: list[dict[str, Any]]) -> None:
        S = self.S
        g = S.SubGraphT()
        g.tensors, g.operators, g.name = [], [], sig.encode()
        _, c, h, w = input_shape
        x = self.tensor(g, [1, h, w, c], name="args_0")
        y, chw = (self.call(g, x), None) if not convs else (x, (c, h, w))
        for i, cv in enumerate(convs):
            y, chw = self.conv(g, y, chw, cv, "output_0" if i == len(convs) - 1 else f"mid{i}")
        g.inputs, g.outputs = [x], [y]
        sd, ti, to = S.SignatureDefT(), S.TensorMapT(), S.TensorMapT()
        ti.name, ti.tensorIndex, to.name, to.tensorIndex = b"args_0", x, b"output_0", y
        sd.inputs, sd.outputs, sd.signatureKey = [ti], [to], sig.encode()
        sd.subgraphIndex = len(self.model.subgraphs)
        self.model.subgraphs.append(g)
        self.model.signatureDefs.append(sd)

    def finish(self) -> bytes:
        import flatbuffers

        b = flatbuffers.Builder(1024)
        b.Finish(self.model.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def grid_model(input_shape: tuple[int, ...], variants: dict[str, list[dict[str, Any]]], *, int8: bool = False,
               seed: int = 0) -> bytes:
    """A .tflite with one subgraph and signature per variant on the input of `input_shape` (1, C, H, W), given to
    the signature NHWC. A variant is a chain of convs {"out", "k", "s", "p", "d"} (out channels; kernel, stride,
    padding, dilation as pairs); [] is the per-call overhead model."""
    w = _Writer(int8, seed)
    for sig, convs in variants.items():
        w.subgraph(sig, tuple(input_shape), convs)
    return w.finish()
