from setuptools import find_packages, setup

setup(
    name="contiv",
    version="0.1.0",
    description="Kubernetes NetworkPolicy in Open vSwitch and node-local DNS, as one Twisted daemon",
    python_requires=">=3.9",
    # twisted/plugins has no __init__.py on purpose: Twisted's own package
    # finds drop-in plugin files in every twisted/plugins directory.
    packages=find_packages(include=["contiv", "contiv.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/contiv_plugin.py"]},
    install_requires=[
        "twisted[conch]>=23.10",
        "treq>=23.11",
        "kubernetes>=28.1",
        "pyyaml>=6.0",
        "prometheus_client>=0.17",
        "pymemcache>=4.0",
        "os-ken>=2.6",
    ],
    entry_points={"console_scripts": ["contivctl = contiv.ctl:main"]},
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "hypothesis>=6.90",
        ],
    },
)
