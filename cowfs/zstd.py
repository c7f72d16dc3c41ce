"""The zstandard package's C backend, loaded without the package's __init__.

`import zstandard` imports `platform` and `typing` (with re and enum: ~20 ms here) only to pick
a backend, and the C one is what it picks on CPython. A FUSE daemon pays that on the way to a
container's first instruction, so the backend is loaded here directly, as the module the
package would load (`zstandard.backend_c`, registered in sys.modules, so a later `import
zstandard` shares its classes: one ZstdError). Where that fails (another interpreter, another
layout) the package is imported as usual.
"""

from __future__ import annotations

import sys


def _backend() -> object:
    name = "zstandard.backend_c"
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        import _frozen_importlib as bootstrap
        import _frozen_importlib_external as external

        for entry in sys.path:
            for suffix in external.EXTENSION_SUFFIXES:
                path = f"{entry or '.'}/zstandard/backend_c{suffix}"
                try:
                    open(path, "rb").close()
                except OSError:
                    continue
                loader = external.ExtensionFileLoader(name, path)
                spec = bootstrap.spec_from_loader(name, loader)
                module = bootstrap.module_from_spec(spec)
                loader.exec_module(module)
                sys.modules[name] = module
                return module
    except Exception:  # noqa: BLE001 - any surprise: the package's own way below
        pass
    import zstandard

    return zstandard


_zstd = _backend()
ZstdCompressor = _zstd.ZstdCompressor  # type: ignore[attr-defined]
ZstdDecompressor = _zstd.ZstdDecompressor  # type: ignore[attr-defined]
ZstdError = _zstd.ZstdError  # type: ignore[attr-defined]
FLUSH_FRAME = _zstd.FLUSH_FRAME  # type: ignore[attr-defined]
