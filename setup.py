"""Build hook for the one compiled part: the fused pixel-moments kernel of ``alexnet-prep pca-stats``.

Everything else (metadata, dependencies, packages) is declared in ``setup.cfg``. The extension is
optional: where no C compiler is available the install still succeeds and pca-stats falls back to
its numpy implementation (same results, about three times slower per image), saying so.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "alexnet.tools._moments",
            sources=["tools/_moments.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
