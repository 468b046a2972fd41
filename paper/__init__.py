"""The CMA-CLIP paper's experiments (Tables 2, 5, 6 and Figure 2) on real products: research code, beside the
production pipeline. It imports `pipeline` and `cmaclip`; neither imports it (tests/test_imports.py)."""
