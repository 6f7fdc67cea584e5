"""The targets/ folder (hardware as data, at the top of the repository) ships inside the wheel as
trp_edge/_targets, so an installed trp-edge lists and loads them (trp_edge.targets.search_dirs). Everything
else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithTargets(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads targets/ where it is
            return
        dest = Path(self.build_lib) / "trp_edge" / "_targets"
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(__file__).resolve().parent.joinpath("targets").glob("*.toml")):
            shutil.copy2(f, dest / f.name)


setup(cmdclass={"build_py": BuildWithTargets})
