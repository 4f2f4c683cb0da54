"""/docs and /redoc work offline: their pages name no URL outside the server, and every asset they load answers."""
from __future__ import annotations

import re

import pytest

from kred.service.app import create_app
from service_helpers import Running, settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_everything_from_the_server(tmp_path, page):
    async with Running(create_app(settings(tmp_path))) as running:
        html = (await running.raw.get(page)).text
        assert re.findall(r"https?://", html) == []            # no CDN, no web font: the page works offline
        assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", html) + re.findall(r"url: ?'([^']+)'", html)
        assets += re.findall(r"""spec-url=["']?([^"' >]+)""", html)
        assert any(a.endswith(".js") for a in assets) and "/openapi.json" in assets
        for asset in assets:
            response = await running.raw.get(asset)
            assert response.status_code == 200, asset
            assert len(response.content) > 100, asset
