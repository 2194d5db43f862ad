"""`both_paths`: run a module's tests once with the compiled kernels (pol/exact/native.py) and once on the torch
path they must equal, so neither implementation of the definition goes untested."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pol.exact import native


@pytest.fixture(scope="module", params=["kernels", "torch"])
def both_paths(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "torch":
        with native.disabled():
            yield "torch"
    else:
        assert native.available(), native.status()  # this suite expects a C compiler: a missing one must show
        yield "kernels"
