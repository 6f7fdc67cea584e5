"""trp_edge.layers: runtime conv kernels matched back to the model's convs by kernel, channels and output size."""

from trp_edge.layers import ConvCall, attribute


def calls():
    return [ConvCall("conv1", "conv1", 3, 3, 3, 16, 32, 32),
            ConvCall("layer1.first", "layer1", 3, 1, 16, 8, 32, 32),
            ConvCall("layer1.second", "layer1", 1, 3, 8, 16, 32, 32),
            ConvCall("conv2", "conv2", 3, 3, 16, 16, 32, 32)]


def op(op, weight, output, ms):
    return {"op": op, "weight": weight, "output": output, "ms": ms}


def test_kernels_roll_up_to_the_layer_they_replaced():
    ops = [op("FusedConv", [16, 3, 3, 3], [1, 16, 32, 32], 1.0),
           # ORT pads the rank-8 pair to its 16-channel NCHWc block: still layer1's first half
           op("Conv", [16, 16, 3, 1], [1, 16, 32, 32], 0.5),
           op("ReorderOutput", None, None, 0.1),  # a layout reorder after a conv is charged to that conv
           op("Conv", [16, 8, 1, 3], [1, 16, 32, 32], 0.25),
           op("Add", None, None, 0.3),
           op("Conv", [16, 16, 3, 3], [1, 16, 32, 32], 2.0)]
    per, other, unmatched = attribute(ops, calls())
    assert per == {"conv1": 1.0, "layer1": 0.85, "conv2": 2.0} and other == 0.3 and unmatched == 0


def test_a_kernel_that_fits_no_conv_is_counted_as_other():
    ops = [op("Conv", [16, 3, 5, 5], [1, 16, 32, 32], 1.0),  # a 5x5 kernel the model does not have
           op("Conv", [16, 3, 3, 3], [1, 16, 16, 16], 2.0),  # right kernel, wrong output size
           op("Conv", [48, 3, 3, 3], [1, 48, 32, 32], 4.0),  # more channels than a block of padding
           op("ReorderOutput", None, None, 0.5)]  # follows no matched conv
    per, other, unmatched = attribute(ops, calls())
    assert per == {} and unmatched == 3 and other == 7.5


def test_each_torch_conv_is_matched_once_in_order():
    same = [ConvCall("a", "a", 3, 3, 16, 16, 8, 8), ConvCall("b", "b", 3, 3, 16, 16, 8, 8)]
    ops = [op("Conv", [16, 16, 3, 3], [1, 16, 8, 8], 1.0), op("Conv", [16, 16, 3, 3], [1, 16, 8, 8], 3.0),
           op("Conv", [16, 16, 3, 3], [1, 16, 8, 8], 5.0)]
    per, other, unmatched = attribute(ops, same)
    assert per == {"a": 1.0, "b": 3.0} and unmatched == 1 and other == 5.0
