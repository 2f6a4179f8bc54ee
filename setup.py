"""Build steps pyproject.toml cannot state.

- The predictive coder's C core (``_pred.c``) is compiled here, at install time, into a shared
  library inside the package, which ``medzip_scp.codec.predictive._core`` loads with ctypes:
  nothing compiles at run time. The library records the sha256 of the source it was built
  from, so a checkout whose ``_pred.c`` changed after ``pip install -e .`` says so instead of
  running a stale core.
- A wheel carries the shipped models and the index migrations as package data
  (``medzip_scp/_shipped/``); an editable install reads them from the checkout.
"""

import hashlib
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CORE_SOURCE = "medzip_scp/codec/predictive/_pred.c"
SHIPPED = ("models", "alembic", "alembic.ini")


class BuildPyWithShippedData(build_py):
    """``build_py`` that also copies :data:`SHIPPED` into ``medzip_scp/_shipped`` of a wheel."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "medzip_scp" / "_shipped"
        for name in SHIPPED:
            source = ROOT / name
            if source.is_dir():
                skip = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(source, target / name, dirs_exist_ok=True, ignore=skip)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)


source_sha256 = hashlib.sha256((ROOT / CORE_SOURCE).read_bytes()).hexdigest()
core = Extension(
    "medzip_scp.codec.predictive._pred",
    sources=[CORE_SOURCE],
    define_macros=[("MZ_SOURCE_SHA256", f'"{source_sha256}"')],
    # integer-only code; keep the flags conservative all the same (no fast-math, no contraction)
    extra_compile_args=["-O2", "-std=c99", "-ffp-contract=off", "-fno-strict-aliasing"],
)

setup(ext_modules=[core], cmdclass={"build_py": BuildPyWithShippedData})
