from setuptools import setup

setup()  # metadata, dependencies and entry points live in setup.cfg
