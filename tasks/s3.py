"""The storage seam on S3 and S3-compatible object stores (MinIO, Ceph RGW), through obstore.

``s3://BUCKET/PREFIX`` is one dataset root. Credentials, region and endpoint come from the standard AWS
sources, in the process that opens the store (the flow's, and each Dask worker's own environment):

- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``;
- ``AWS_PROFILE`` and the ``~/.aws/credentials`` / ``~/.aws/config`` files (through boto3's session, which
  also covers instance and container roles) when no key is in the environment;
- ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; ``AWS_ENDPOINT_URL`` for S3-compatible servers; plain-http
  endpoints only with ``AWS_ALLOW_HTTP=true``.

No credential is ever part of a URL, a flow parameter, a log line or the provenance.

Why obstore (zarr's ``ObjectStore``) and not s3fs (``FsspecStore``): dogflow's markers and lock need a
create-only put (``If-None-Match: *``) and a put conditional on the ETag (``If-Match``), which obstore has as
``mode="create"`` and ``mode={"e_tag": ...}`` and which S3 executes atomically; fsspec's create-only write is an
exists-then-put, two requests, not atomic. obstore's requests run concurrently in Rust (zarr's chunk reads and
writes of one position overlap). Measured in ``benchmarks/output_write.py --s3``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from tasks.storage import ObjectStat, Storage, StoreError

_RETRY = {"max_retries": 3, "backoff": {"init_backoff": timedelta(milliseconds=100),
                                        "max_backoff": timedelta(seconds=5)},
          "retry_timeout": timedelta(seconds=30)}


def _split(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"an s3:// URL needs a bucket: {url}")
    return bucket, prefix.strip("/")


def _credentials() -> dict[str, Any]:
    """Keyword arguments of obstore's S3Store for this process's AWS settings (see the module docstring)."""
    kw: dict[str, Any] = {}
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        kw["endpoint"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not env.get("AWS_ACCESS_KEY_ID"):
        try:  # a profile, the ~/.aws files, or an instance/container role
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider

            session = boto3.Session(profile_name=env.get("AWS_PROFILE") or None)
            if session.get_credentials() is not None:
                kw["credential_provider"] = Boto3CredentialProvider(session)
                region = region or session.region_name
        except Exception:  # no boto3, an unknown profile: obstore's own environment lookup says what is missing
            pass
    kw["region"] = region or "us-east-1"
    return kw


class S3Storage(Storage):
    """One dataset root on S3 (``s3://BUCKET/PREFIX``)."""

    def __init__(self, url: str):
        self.bucket, self.prefix = _split(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._kw = _credentials()
        self.store = self._store(self.prefix)

    def _store(self, prefix: str):
        from obstore.store import S3Store

        allow_http = os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes")
        # the constructor also reads the AWS_* environment variables itself
        return S3Store(self.bucket, prefix=prefix or None, client_options={"allow_http": allow_http},
                       retry_config=_RETRY, **self._kw)

    def __getstate__(self) -> dict[str, Any]:  # travels to Dask workers as its URL: each reads its own credentials
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])

    def _fail(self, exc: BaseException, key: str = "") -> StoreError:
        """One line naming the URL and the cause (never the credentials)."""
        where = f"{self.url}/{key}" if key else self.url
        text = str(exc)
        low = text.lower()
        if "nosuchbucket" in low or "bucket does not exist" in low:
            cause = f"bucket {self.bucket!r} does not exist"
        elif "403" in text or "accessdenied" in low or "forbidden" in low or "invalidaccesskeyid" in low \
                or "signaturedoesnotmatch" in low:
            cause = "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)"
        elif "error sending request" in low or "connect" in low or "dns" in low or "timed out" in low:
            cause = f"cannot reach the endpoint {self._kw.get('endpoint') or 'of AWS S3'}"
        elif "credential" in low or "access key" in low:
            cause = "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        else:
            cause = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        return StoreError(f"{where}: {cause}")

    def zarr_store(self, key: str = "", read_only: bool = False) -> Any:
        from zarr.storage import ObjectStore

        prefix = f"{self.prefix}/{key}".strip("/") if key else self.prefix
        return ObjectStore(self._store(prefix), read_only=read_only)

    def exists(self, key: str = "") -> bool:
        import obstore as obs

        try:
            if not key:  # the root: any object under the prefix
                page = next(iter(obs.list(self.store, None, chunk_size=1)), [])
                return bool(page)
            obs.head(self.store, key)
            return True
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._fail(exc, key) from None

    def read_bytes(self, key: str) -> bytes | None:
        import obstore as obs

        try:
            return bytes(obs.get(self.store, key).bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail(exc, key) from None

    def _put(self, key: str, data: bytes | str, mode: Any = None) -> str | None:
        import obstore as obs

        payload = data.encode() if isinstance(data, str) else bytes(data)
        result = obs.put(self.store, key, payload, mode=mode) if mode is not None else obs.put(self.store, key, payload)
        return result.get("e_tag")

    def write_atomic(self, key: str, data: bytes | str) -> None:
        try:
            self._put(key, data)  # an S3 PUT replaces the object as a whole
        except Exception as exc:
            raise self._fail(exc, key) from None

    def create_exclusive(self, key: str, data: bytes | str) -> bool:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            self._put(key, data, mode="create")  # If-None-Match: *
            return True
        except (AlreadyExistsError, PreconditionError):
            return False
        except Exception as exc:
            raise self._fail(exc, key) from None

    def replace_if(self, key: str, data: bytes | str, version: str) -> bool:
        return self.refresh(key, data, version) is not None

    def refresh(self, key: str, data: bytes | str, version: str) -> str | None:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return self._put(key, data, mode={"e_tag": version})  # If-Match: the ETag
        except (PreconditionError, AlreadyExistsError, FileNotFoundError):
            return None
        except Exception as exc:
            raise self._fail(exc, key) from None

    @staticmethod
    def _stat_of(meta: dict[str, Any]) -> ObjectStat:
        return ObjectStat(int(meta["size"]), str(meta.get("e_tag") or ""), meta["last_modified"].timestamp())

    def stat(self, key: str) -> ObjectStat | None:
        import obstore as obs

        try:
            return self._stat_of(obs.head(self.store, key))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail(exc, key) from None

    def stat_many(self, keys: list[str]) -> dict[str, ObjectStat | None]:
        """One listing under the keys' common folder instead of a HEAD each."""
        import obstore as obs

        if len(keys) < 4:
            return super().stat_many(keys)
        common = os.path.commonprefix(keys)
        folder = common[: common.rfind("/") + 1] if "/" in common else ""
        wanted = set(keys)
        found: dict[str, ObjectStat | None] = {k: None for k in keys}
        try:
            for page in obs.list(self.store, folder or None):
                for meta in page:
                    if meta["path"] in wanted:
                        found[meta["path"]] = self._stat_of(meta)
        except Exception as exc:
            raise self._fail(exc, folder) from None
        return found

    def delete(self, key: str) -> None:
        import obstore as obs

        try:
            obs.delete(self.store, key)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail(exc, key) from None

    def delete_tree(self, prefix: str) -> None:
        import obstore as obs

        try:
            for page in obs.list(self.store, prefix.rstrip("/") + "/"):
                paths = [m["path"] for m in page]
                if paths:
                    obs.delete(self.store, paths)
        except Exception as exc:
            raise self._fail(exc, prefix) from None
        self.delete(prefix)

    def list(self, prefix: str = "") -> list[str]:
        import obstore as obs

        p = prefix.rstrip("/") + "/" if prefix else None
        try:
            res = obs.list_with_delimiter(self.store, p)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._fail(exc, prefix) from None
        names = [m["path"].rstrip("/").rsplit("/", 1)[-1] for m in res["objects"]]
        names += [c.rstrip("/").rsplit("/", 1)[-1] for c in res["common_prefixes"]]
        return sorted(set(names))

    def check_writable(self) -> None:
        """Create and remove a probe object: a missing bucket, denied access or an unreachable endpoint is
        one line, before anything is written."""
        import uuid

        key = f".dogflow-probe-{uuid.uuid4().hex}"
        try:
            self._put(key, b"")
        except Exception as exc:
            raise self._fail(exc) from None
        self.delete(key)
