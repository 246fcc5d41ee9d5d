"""One conversation turn: language → retrieval → prompt → generation → citations; `python -m chatbot` is the CLI.

Tests live in tests/test_{engine,assistant,grounding,language,cli}.py.
"""
