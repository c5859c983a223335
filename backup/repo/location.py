"""Where a repository lives: a directory, or ``s3://BUCKET/PREFIX?endpoint=URL&region=R`` (design §3.7).

One parser for every place that takes a repository (CLI, QMP, ``serve --repo``), so they all accept
the same spellings. Credentials never appear here: boto3's standard chain finds them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from .errors import RepoError

#: S3's bucket naming rules (lower case, digits, dots, hyphens; 3-63 characters).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PARAMS = ("endpoint", "region")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing "/"; "" for the bucket's root
    endpoint: str | None = None
    region: str | None = None

    @property
    def url(self) -> str:
        """The location as the user writes it (what messages name)."""
        query = "&".join(f"{k}={v}" for k, v in (("endpoint", self.endpoint), ("region", self.region)) if v)
        path = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return path + (f"?{query}" if query else "")

    def key(self, name: str) -> str:
        """The object key of ``name`` (relative to the repository)."""
        return f"{self.prefix}/{name}" if self.prefix else name


def is_s3(location: str | Path) -> bool:
    # a Path collapses "s3://" into "s3:/"
    return str(location).startswith("s3:/")


def parse_s3(location: str | Path) -> S3Location:
    """Parse ``s3://BUCKET[/PREFIX][?endpoint=URL&region=R]``; a RepoError names what is wrong."""
    text = str(location)
    if text.startswith("s3:/") and not text.startswith("s3://"):
        text = "s3://" + text[4:]  # given as a Path: "//" became "/" (and in the endpoint too)
        text = re.sub(r"(endpoint=https?:)/(?!/)", r"\1//", text)
    parts = urlsplit(text)
    if parts.scheme != "s3" or parts.fragment:
        raise RepoError(f"invalid repository location {text!r}: s3://BUCKET[/PREFIX][?endpoint=URL&region=R]")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket):
        raise RepoError(f"invalid S3 bucket name {bucket!r} in {text!r}")
    prefix = parts.path.strip("/")
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
        raise RepoError(f"invalid S3 prefix {prefix!r} in {text!r}")
    params: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k not in _PARAMS or k in params or not v:
            raise RepoError(f"invalid repository location {text!r}: query parameters are endpoint= and region=")
        params[k] = v
    endpoint = params.get("endpoint")
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise RepoError(f"invalid S3 endpoint {endpoint!r}: an http:// or https:// URL")
    return S3Location(bucket, prefix, endpoint, params.get("region"))
