"""Image URLs of a chat request -> bytes -> checked -> PageViews, with a clear APIError for every way that fails.

Schemes: `data:` (base64), `s3://bucket/key` only under the operator's `allowed_s3_prefixes` (empty by default: the
server's S3 credentials are not a client's to aim; boto3, endpoint from `s3_endpoint_url` or boto3's usual chain, e.g.
AWS_ENDPOINT_URL), and `http(s)://` only for hosts on `allowed_http_hosts` (empty by default; redirects are not
followed, so an allowed host cannot bounce us elsewhere). An http(s) URL whose host two parsers could read differently
is refused before the allow-list is consulted: a user part (`user@host`: it would be sent on as Basic credentials, and
`allowed@other` names `other`), backslashes, whitespace or control characters, and a non-ASCII or percent-encoded
authority (IDN look-alikes; an internationalized name is written in its `xn--` form). A missing and a forbidden object
get the same answer, so a client cannot probe which objects exist. Sizes are checked before bytes are held in full:
the base64 length, S3's ContentLength and a capped read of HTTP bodies. Pixels are checked from the image header
(`model.windows.open_image`) before anything is decoded, so a decompression bomb costs a header read; decoding and
cutting run in a worker thread, never on the event loop that other requests share.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import threading
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from model.windows import ImageError, PageViews, WindowConfig, open_image, prepare_image

from .config import split_s3_prefix, valid_bucket
from .schemas import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePolicy:
    max_image_bytes: int
    windows: WindowConfig  # its max_pixels is the megapixel limit; the rest decides how pages are cut
    allowed_http_hosts: tuple[str, ...] = ()
    allowed_s3_prefixes: tuple[str, ...] = ()  # `bucket` or `bucket/prefix`; empty: s3:// refused
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


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # PIL names its file object: `<_io.BytesIO object at 0x7f..>`


def image_error(e: ImageError) -> APIError:
    message = _OBJECT_REPR.sub("the image data", str(e))  # no process addresses in answers
    if e.kind == "too_large":
        return APIError(400, message, "image_too_many_pixels", param="messages")
    return APIError(400, f"image could not be read: {message}", "invalid_image", param="messages")


def _prepare(data: bytes, windows: WindowConfig) -> PageViews:
    check_header(data, windows)  # header only: refuses bombs before a pixel is decoded
    try:
        return prepare_image(data, windows)
    except ImageError as e:
        raise image_error(e) from None


_UNSAFE_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")  # control characters, whitespace, backslash


def _bad_url(message: str) -> APIError:
    return APIError(400, message, "invalid_image_url", param="messages")


def check_http_url(url: str) -> SplitResult:
    """The parts of an http(s) image URL whose host every parser reads the same; APIError(400) for the rest.

    urllib (which the allow-list reads) and httpx (which fetches) disagree on backslashes and on what a user part
    hides, and httpx would send a user part on as `Authorization: Basic ...` to the host."""
    bad = _UNSAFE_URL_CHARS.search(url)
    if bad:
        what = "a backslash" if bad.group() == "\\" else "whitespace or a control character"
        raise _bad_url(f"image URL contains {what}; percent-encode it, or send the image as a data: URL")
    parts = urlsplit(url)
    if "@" in parts.netloc:  # the message never repeats the user part: it may be a password
        raise _bad_url(
            f"image URL for host {parts.netloc.rpartition('@')[2]!r} has a user part (user@host); this server "
            "sends no credentials with image downloads: remove it"
        )
    if not parts.netloc.isascii() or "%" in parts.netloc:
        raise _bad_url(
            "image URL host must be plain ASCII: write an internationalized name in its xn-- (punycode) form "
            "and do not percent-encode it"
        )
    import httpx

    try:
        port = parts.port
        fetched = httpx.URL(url)  # what the download would really contact
    except (ValueError, httpx.InvalidURL) as e:
        raise _bad_url(f"image URL {url!r} is not a valid URL: {e}") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise _bad_url(f"image URL {url!r} has no host")
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    if (
        fetched.userinfo
        or fetched.raw_host.decode("ascii").lower() != host
        or (fetched.port or default) != (port or default)
    ):
        raise _bad_url(f"image URL {url!r} does not name one host unambiguously")
    return parts


class ImageFetcher:
    def __init__(self, policy: ImagePolicy):
        self.policy = policy
        self._s3 = None
        self._s3_lock = threading.Lock()
        self._http = None

    async def load(self, url: str) -> PageViews:
        """URL -> checked, decoded and cut page (base64, header check, decode and cut run in a worker thread)."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return await asyncio.to_thread(self._load_data_url, url)
        data = await self.fetch(url)
        return await asyncio.to_thread(_prepare, data, self.policy.windows)

    def _load_data_url(self, url: str) -> PageViews:
        return _prepare(decode_data_url(url, self.policy.max_image_bytes), self.policy.windows)

    async def fetch(self, url: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return decode_data_url(url, self.policy.max_image_bytes)
        if scheme == "s3":
            bucket, key = self.s3_location(url)  # refused here, before a thread or a connection
            return await asyncio.to_thread(self._s3_get, bucket, key)
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

    def s3_location(self, url: str) -> tuple[str, str]:
        """(bucket, key) of an s3:// URL the operator allows; APIError(400) otherwise, without contacting S3."""
        parts = urlsplit(url)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        if not self.policy.allowed_s3_prefixes:
            raise APIError(
                400,
                "s3:// image URLs are disabled on this server; the operator enables them by listing buckets or "
                "prefixes in `allowed_s3_prefixes` (e.g. ['scans', 'pages/public/']); send a data: URL instead",
                "unsupported_image_url",
                param="messages",
            )
        if not bucket or not key:
            raise APIError(
                400, f"s3 URL {url!r} needs a bucket and a key (s3://bucket/key)", "invalid_image_url", param="messages"
            )
        if not valid_bucket(bucket):
            raise APIError(400, f"{bucket!r} is not a valid S3 bucket name", "invalid_image_url", param="messages")
        if len(key.encode("utf-8", "replace")) > 1024:
            raise APIError(400, "S3 keys are at most 1024 bytes", "invalid_image_url", param="messages")
        for entry in self.policy.allowed_s3_prefixes:
            allowed_bucket, prefix = split_s3_prefix(entry)
            if bucket == allowed_bucket and key.startswith(prefix):
                return bucket, key
        raise APIError(
            400,
            f"s3://{bucket}/{key} is outside the S3 prefixes this server reads images from",
            "image_not_allowed",
            param="messages",
        )

    def _s3_get(self, bucket: str, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

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
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in (
                "NoSuchKey",
                "NoSuchBucket",
                "404",
                "NotFound",
                "AccessDenied",
                "403",
                "Forbidden",
            ) or status in (
                403,
                404,
            ):
                # One answer for missing and forbidden: otherwise a client learns which objects exist.
                raise APIError(
                    400,
                    f"image s3://{bucket}/{key} does not exist or this server may not read it",
                    "image_not_found",
                    param="messages",
                ) from None
            log.warning("s3 fetch of s3://%s/%s failed: %s", bucket, key, e)
            if 400 <= status < 500:  # e.g. a key S3 refuses: the request's problem, not the server's
                raise APIError(
                    400, f"S3 refused s3://{bucket}/{key} ({code})", "image_fetch_failed", param="messages"
                ) from None
            raise APIError(502, f"could not fetch s3://{bucket}/{key}: {code}", "image_fetch_failed") from None
        except BotoCoreError as e:  # endpoint down, timeouts, no credentials
            log.warning("s3 fetch of s3://%s/%s failed: %s", bucket, key, e)
            raise APIError(
                502, f"could not fetch s3://{bucket}/{key}: {type(e).__name__}", "image_fetch_failed"
            ) from None
        if len(data) > limit:
            raise _too_big(len(data), limit, f"s3://{bucket}/{key}")
        return data

    # ---- HTTP(S) -----------------------------------------------------------------------------------------------------
    def host_allowed(self, url: str) -> bool:
        try:
            return self._allowed(check_http_url(url))
        except APIError:
            return False

    def _allowed(self, parts: SplitResult) -> bool:
        allowed = {h.lower() for h in self.policy.allowed_http_hosts}
        return parts.hostname.lower() in allowed or parts.netloc.lower() in allowed  # `host` or `host:port` entries

    async def _http_get(self, url: str) -> bytes:
        if not self.policy.allowed_http_hosts:
            raise APIError(
                400,
                "http(s) image URLs are disabled on this server; send a data: or s3:// URL",
                "unsupported_image_url",
                param="messages",
            )
        parts = check_http_url(url)  # before the allow-list: a URL that could name two hosts names none
        if not self._allowed(parts):
            raise APIError(
                400,
                f"image host {parts.hostname!r} is not on this server's allow-list",
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
                if r.is_redirect:  # its target is not checked against the allow-list, so it is not followed
                    raise APIError(
                        400,
                        f"image {url} answered HTTP {r.status_code}, a redirect; this server does not follow "
                        "redirects: send the URL it points to",
                        "image_fetch_failed",
                        param="messages",
                    )
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
