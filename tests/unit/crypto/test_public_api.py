"""The package's public surface, its import rules, and its docstring examples."""

from __future__ import annotations

import ast
import doctest
import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

import ensync.crypto
from ensync.crypto import _base64, _sodium, envelope, keys

__all__: list[str] = []

MODULES: list[ModuleType] = [ensync.crypto, keys, envelope, _base64, _sodium]
CRYPTO_DIR = Path(ensync.crypto.__file__).parent

# Names other parts of ensync import; renaming one breaks them.
PROMISED = {
    "KeyPair",
    "generate_keypair",
    "keypair_from_seed",
    "decode_app_id",
    "is_app_id",
    "decode_secret_key",
    "x25519_public",
    "x25519_secret",
    "seal",
    "seal_hybrid",
    "open_payload",
    "envelope_kind",
}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_all_lists_only_real_names(module: ModuleType) -> None:
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name}"


def test_package_reexports_every_public_name() -> None:
    public = set(keys.__all__) | set(envelope.__all__)
    assert set(ensync.crypto.__all__) == public
    assert set(ensync.crypto.__all__) >= PROMISED


def test_modules_import_only_nacl_json_stdlib_and_errors() -> None:
    # crypto is sans-I/O and sits below client/server (STYLE.md): no grpc,
    # websockets, or other ensync layers.
    allowed_ensync = {"ensync.errors", "ensync.crypto", "ensync._json", "ensync._entropy"}
    for path in sorted(CRYPTO_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "ensync":
                    assert any(name == a or name.startswith(a + ".") for a in allowed_ensync), (
                        f"{path.name} imports {name}"
                    )
                else:
                    codecs = {"nacl", "orjson"}
                    assert top in codecs or top in sys.stdlib_module_names, (
                        f"{path.name} imports {name}"
                    )


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    module = importlib.import_module(module.__name__)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0
