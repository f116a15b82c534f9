"""Installs the pure-Python `kvrecall` package. At build time a copy of the C ABI library is
placed inside the package: $KVRECALL_LIBRARY when set, else the repository's release build
(../.build/release/libKVRecallC.so) when it exists; the repository's path is recorded so the
package can also find a later build."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(HERE)


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "kvrecall")
        with open(os.path.join(target, "_repository.txt"), "w") as f:
            f.write(REPOSITORY)
        built = os.environ.get("KVRECALL_LIBRARY") or os.path.join(REPOSITORY, ".build", "release", "libKVRecallC.so")
        if os.path.exists(built):
            os.makedirs(os.path.join(target, "lib"), exist_ok=True)
            shutil.copy2(built, os.path.join(target, "lib", "libKVRecallC.so"))


setup(cmdclass={"build_py": BuildWithLibrary})
