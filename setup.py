"""Build hook for fastgrok.

Everything declarative lives in pyproject.toml. This file exists for the
optional C++ CPU engine in csrc/: when its sources are present and a compiler
works, it is built as ``fastgrok._cpu_engine``; when the build fails, fastgrok
still installs and the ``cpu`` backend reports why it is unavailable.
"""
from setuptools import setup

setup()
