"""Triton kernels of kalm_fast, installed as ``kalm_fast.kernels`` (one op a file).

Nothing of kalm_fast is imported here. This folder sits at the repository root (SPEC's layout), so whenever the root is
on ``sys.path`` (``python -m bench`` from a checkout, a subprocess with ``cwd`` there) it is also found as the top-level
package ``kernels`` — the name of the Hugging Face kernel hub, which transformers >= 5.2x imports unconditionally
(``transformers.integrations.hub_kernels``: ``from kernels import ...``). Found under that name, this file hands the
name over to the installed ``kernels`` distribution found on the rest of ``sys.path`` (the import system returns
whatever ``sys.modules["kernels"]`` holds once this file has run). With none installed it leaves what a stray
namespace folder would: an empty package with no file and no version, which transformers' availability check
(``_is_package_available``: no metadata, so it imports the name) reads as "not installed"; ``from kernels import x``
raises ImportError. Raising ModuleNotFoundError here instead escapes that check: transformers 5.17 (the GPU machine's,
where the hub is not installed) then cannot import ``modeling_utils``, so Qwen2 and mergekit fail from a checkout.
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
        if spec is None:  # no hub installed: an empty namespace-like package (no __file__, no __version__)
            empty = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
            sys.modules["kernels"] = importlib.util.module_from_spec(empty)
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _hand_over()
    del _hand_over
