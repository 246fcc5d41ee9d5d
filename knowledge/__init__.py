"""Documents → chunks → indexes (FAISS + BM25) → `Retriever.search()`. Imports only `common`, none of the other
packages.

Run `python -m knowledge --help` for the command line; tests live in tests/test_{loaders,chunking,store,retriever}.py.
"""
