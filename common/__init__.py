"""What every package shares and no package owns: the app's data folders, the dataclass-to-flags CLI helpers, and
which language (and script) a text is in. Imports nothing from the other packages, so all of them may use it:
common ← knowledge ← chatbot ← finetune.

Tests live in tests/test_common.py and tests/test_language.py.
"""
