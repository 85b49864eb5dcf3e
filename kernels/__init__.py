"""Triton kernels of kalm_fast, installed as ``kalm_fast.kernels`` (one op a file).

Nothing of kalm_fast is imported here. This folder sits at the repository root (SPEC's layout), so whenever the root is
on ``sys.path`` (``python -m bench`` from a checkout, a subprocess with ``cwd`` there) it is also found as the top-level
package ``kernels`` — the name of the Hugging Face kernel hub, which transformers >= 5.2x imports unconditionally
(``transformers.integrations.hub_kernels``: ``from kernels import ...``). Found under that name, this file hands the
name over to the installed ``kernels`` distribution found on the rest of ``sys.path`` (the import system returns
whatever ``sys.modules["kernels"]`` holds once this file has run), or fails as if no ``kernels`` were installed.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over() -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None:
            raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is "
                                      "kalm_fast.kernels, not the Hugging Face kernel hub)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _hand_over()
    del _hand_over
