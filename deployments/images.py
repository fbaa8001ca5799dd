"""Image URLs of a chat request -> bytes -> checked -> PageViews, with a clear APIError for every way that fails.

Schemes: `data:` (base64), `s3://bucket/key` (boto3; endpoint from `s3_endpoint_url` or boto3's usual chain, e.g.
AWS_ENDPOINT_URL), and `http(s)://` only for hosts on `allowed_http_hosts` (empty by default; redirects are not
followed, so an allowed host cannot bounce us elsewhere). Sizes are checked before bytes are held in full: the base64
length, S3's ContentLength and a capped read of HTTP bodies. Pixels are checked from the image header
(`model.windows.open_image`) before anything is decoded, so a decompression bomb costs a header read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from model.windows import ImageError, PageViews, WindowConfig, open_image, prepare_image

from .schemas import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePolicy:
    max_image_bytes: int
    windows: WindowConfig  # its max_pixels is the megapixel limit; the rest decides how pages are cut
    allowed_http_hosts: tuple[str, ...] = ()
    s3_endpoint_url: str | None = None
    fetch_timeout_s: float = 10.0


def _too_big(n: int, limit: int, what: str) -> APIError:
    return APIError(
        413,
        f"{what} is {n} bytes, over the {limit}-byte image limit (max_image_bytes)",
        "image_too_large",
        param="messages",
    )


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """`data:image/png;base64,....` -> bytes."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise APIError(400, "data: URL has no ',' before the payload", "invalid_image_url", param="messages")
    params = head[len("data:") :].split(";")
    if "base64" not in params[1:]:
        raise APIError(
            400, "data: image URLs must be base64 (data:image/png;base64,...)", "invalid_image_url", param="messages"
        )
    mime = params[0].lower()
    if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
        raise APIError(
            400, f"data: URL has media type {mime!r}; send an image/* type", "invalid_image_url", param="messages"
        )
    payload = "".join(payload.split())  # line breaks are legal inside base64 text
    decoded_size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if decoded_size > max_bytes:
        raise _too_big(decoded_size, max_bytes, "the data: image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"data: URL payload is not valid base64: {e}", "invalid_base64", param="messages") from None


def check_header(data: bytes, windows: WindowConfig) -> None:
    """Megapixels from the header only (no decode)."""
    try:
        open_image(data, windows)
    except ImageError as e:
        raise image_error(e) from None


def image_error(e: ImageError) -> APIError:
    if e.kind == "too_large":
        return APIError(400, f"{e}", "image_too_many_pixels", param="messages")
    return APIError(400, f"image could not be read: {e}", "invalid_image", param="messages")


class ImageFetcher:
    def __init__(self, policy: ImagePolicy):
        self.policy = policy
        self._s3 = None
        self._s3_lock = threading.Lock()
        self._http = None

    async def load(self, url: str) -> PageViews:
        """URL -> checked, decoded and cut page (decode and cut run in a worker thread)."""
        data = await self.fetch(url)
        check_header(data, self.policy.windows)
        try:
            return await asyncio.to_thread(prepare_image, data, self.policy.windows)
        except ImageError as e:
            raise image_error(e) from None

    async def fetch(self, url: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return decode_data_url(url, self.policy.max_image_bytes)
        if scheme == "s3":
            return await asyncio.to_thread(self._s3_get, url)
        if scheme in ("http", "https"):
            return await self._http_get(url)
        raise APIError(
            400,
            f"unsupported image URL scheme {scheme + ':' if scheme else url[:20]!r}; use data:, s3:// or "
            "http(s):// (allowed hosts only)",
            "unsupported_image_url",
            param="messages",
        )

    # ---- S3 ----------------------------------------------------------------------------------------------------------
    def _s3_client(self):
        with self._s3_lock:  # boto3 client creation is not thread-safe; the client itself is
            if self._s3 is None:
                import boto3
                from botocore.config import Config

                cfg = Config(
                    connect_timeout=min(5.0, self.policy.fetch_timeout_s),
                    read_timeout=self.policy.fetch_timeout_s,
                    retries={"max_attempts": 2, "mode": "standard"},
                )
                self._s3 = boto3.session.Session().client("s3", endpoint_url=self.policy.s3_endpoint_url, config=cfg)
            return self._s3

    def _s3_get(self, url: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        parts = urlsplit(url)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        if not bucket or not key:
            raise APIError(
                400, f"s3 URL {url!r} needs a bucket and a key (s3://bucket/key)", "invalid_image_url", param="messages"
            )
        limit = self.policy.max_image_bytes
        try:
            obj = self._s3_client().get_object(Bucket=bucket, Key=key)
            size = obj.get("ContentLength")
            body = obj["Body"]
            if size is not None and size > limit:
                body.close()
                raise _too_big(size, limit, f"s3://{bucket}/{key}")
            data = body.read(limit + 1)
            body.close()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
                raise APIError(
                    400, f"image s3://{bucket}/{key} does not exist ({code})", "image_not_found", param="messages"
                ) from None
            if code in ("AccessDenied", "403", "Forbidden"):
                raise APIError(
                    400, f"image s3://{bucket}/{key}: access denied", "image_forbidden", param="messages"
                ) from None
            log.warning("s3 fetch of s3://%s/%s failed: %s", bucket, key, e)
            raise APIError(502, f"could not fetch s3://{bucket}/{key}: {code}", "image_fetch_failed") from None
        except BotoCoreError as e:  # endpoint down, timeouts, no credentials
            log.warning("s3 fetch of s3://%s/%s failed: %s", bucket, key, e)
            raise APIError(502, f"could not fetch s3://{bucket}/{key}: {e}", "image_fetch_failed") from None
        if len(data) > limit:
            raise _too_big(len(data), limit, f"s3://{bucket}/{key}")
        return data

    # ---- HTTP(S) -----------------------------------------------------------------------------------------------------
    def host_allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        allowed = {h.lower() for h in self.policy.allowed_http_hosts}
        return bool(host) and (host in allowed or parts.netloc.lower() in allowed)

    async def _http_get(self, url: str) -> bytes:
        if not self.policy.allowed_http_hosts:
            raise APIError(
                400,
                "http(s) image URLs are disabled on this server; send a data: or s3:// URL",
                "unsupported_image_url",
                param="messages",
            )
        if not self.host_allowed(url):
            raise APIError(
                400,
                f"image host {urlsplit(url).hostname!r} is not on this server's allow-list",
                "image_host_not_allowed",
                param="messages",
            )
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.policy.fetch_timeout_s, follow_redirects=False, trust_env=False)
        limit = self.policy.max_image_bytes
        try:
            async with self._http.stream("GET", url) as r:
                if r.status_code == 404:
                    raise APIError(400, f"image {url} does not exist (HTTP 404)", "image_not_found", param="messages")
                if r.status_code != 200:
                    raise APIError(
                        400, f"image {url} answered HTTP {r.status_code}", "image_fetch_failed", param="messages"
                    )
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise _too_big(int(declared), limit, url)
                data = bytearray()
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise _too_big(len(data), limit, url)
                return bytes(data)
        except httpx.HTTPError as e:
            raise APIError(400, f"could not fetch {url}: {e}", "image_fetch_failed", param="messages") from None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
