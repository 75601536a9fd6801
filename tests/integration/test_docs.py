"""/docs and /redoc work offline: every asset they name is served here, and nothing calls out."""

from __future__ import annotations

import re

import pytest

from tests.support import Service


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_a_docs_page_loads_only_assets_the_service_serves(
    service: Service, page: str
) -> None:
    async with service.http.get(service.url + page) as r:
        assert r.status == 200
        html = await r.text()
    assets = re.findall(r"""(?:src|href|url|spec-url)\s*[=:]\s*["']([^"']+)["']""", html)
    assert assets
    for asset in assets:
        assert asset.startswith("/"), f"{page} names {asset}, outside the service"
        async with service.http.get(service.url + asset) as r:
            assert r.status == 200, asset


async def test_swagger_ui_does_not_send_the_spec_address_to_its_online_validator(
    service: Service,
) -> None:
    # Swagger UI's default validatorUrl makes every browser that opens /docs on a host other
    # than localhost load a badge from validator.swagger.io, naming this service's spec URL.
    async with service.http.get(service.url + "/docs") as r:
        html = await r.text()
    assert re.search(r"validatorUrl:\s*null", html), "the online validator is not turned off"


async def test_swagger_ui_takes_no_options_from_the_query_string(service: Service) -> None:
    # Swagger UI 4.1.0 reads its options from the query (CVE-2018-25031): /docs?url=... would
    # show another site's spec on this origin. The page drops the query before it starts,
    # and the bundle's own index.html, which reads it too, is not served.
    async with service.http.get(service.url + "/docs?url=https://evil.example/spec.json") as r:
        html = await r.text()
    dropped = html.find("history.replaceState(null")
    assert 0 <= dropped < html.index("SwaggerUIBundle({")
    for page in ("index.html", "oauth2-redirect.html"):
        async with service.http.get(f"{service.url}/static/swagger/{page}") as r:
            assert r.status == 404, page


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_a_docs_page_may_load_images_and_data_from_the_service_alone(
    service: Service, page: str
) -> None:
    # ReDoc's bundle shows a logo from cdn.redoc.ly in its sidebar, whatever its options:
    # the page's policy is what keeps a browser from fetching it.
    async with service.http.get(service.url + "/static/redoc/redoc.standalone.js") as r:
        assert "https://cdn.redoc.ly/redoc/logo-mini.svg" in await r.text()
    async with service.http.get(service.url + page) as r:
        assert r.status == 200
        policy = r.headers.get("Content-Security-Policy", "")
    directives = {
        name: sources
        for name, *sources in (part.split() for part in policy.split(";") if part.strip())
    }
    assert set(directives.get("img-src", ["*"])) <= {"'self'", "data:"}, policy
    assert directives.get("connect-src") == ["'self'"], policy
    assert directives.get("frame-ancestors") == ["'none'"], policy


async def test_the_docs_pages_assets_are_served_as_what_they_are(service: Service) -> None:
    # Every answer says nosniff: a script or style sheet served under another type would
    # then not run, and the pages would be blank.
    async with service.http.get(service.url + "/docs") as r:
        swagger = await r.text()
    async with service.http.get(service.url + "/redoc") as r:
        redoc = await r.text()
    assets = re.findall(r'(?:src|href)="(/static/[^"]+\.(?:js|css))"', swagger + redoc)
    assert len(assets) == 4, assets
    for asset in assets:
        async with service.http.get(service.url + asset) as r:
            assert r.status == 200, asset
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            wanted = "text/css" if asset.endswith(".css") else "javascript"
            assert wanted in r.content_type, (asset, r.content_type)
