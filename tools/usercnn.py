"""A user's own CNN for tools/bench_zoo.py, in a module of its own so a pickled copy unpickles in another
process (a pickle names its class by module: one defined in a script's __main__ cannot be found elsewhere)."""

from torch import nn


class UserCNN(nn.Module):
    """A user's own net (VGG-style with a MobileNetV2-style inverted residual), for 28x28 grey images."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def cbr(cin, cout, stride=1, groups=1, k=3):
            return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*cbr(1, 64), *cbr(64, 64), *cbr(64, 128, 2), *cbr(128, 128),
                                      *cbr(128, 256, 2), *cbr(256, 256))
        self.expand = nn.Sequential(*cbr(256, 512, k=1), *cbr(512, 512, groups=512), nn.Conv2d(512, 256, 1))
        self.classifier = nn.Linear(256, classes)

    def forward(self, x):
        x = self.features(x)
        x = x + self.expand(x)
        return self.classifier(x.mean((2, 3)))
