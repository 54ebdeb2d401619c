"""Fused kernels for the EqM sampler, each with a torch reference.

Import from the kernel modules, e.g. ``from kernels.nag_step import nag_step``.
The package deliberately re-exports nothing: a package attribute named
``nag_step`` would shadow the ``kernels.nag_step`` submodule for
``import kernels.nag_step as ns``.

To run the Triton kernels on CPU under the interpreter, set TRITON_INTERPRET=1
before triton is first imported in the process.
"""
