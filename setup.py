"""Kept so that older pip and `python setup.py` tooling still work; metadata lives in setup.cfg."""
from setuptools import setup

setup()
