"""Credentials in tracking URIs and MLflow's variables: where they are taken out of a URI, and the one
filter (redact) for everything ditscale writes or prints. Its own module so that every room that writes
(tracking, tracking_inputs, launch, cli, analysis) can import it without importing the others."""
from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, quote, unquote, urlencode

_SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "auth")


def redact_uri(uri: str | None) -> str | None:
    """`uri` as it may be written or printed: the user-info of a URI (`scheme://user:pw@host/...`) becomes
    `***@`, and query parameters that look like secrets (`?password=...`) become `***`. The real URI is
    still the one to connect with; this is the only form that goes into params, artifacts and output."""
    if not uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    # The last `@` before any query: a password with an unescaped `/` still counts as user-info.
    at = rest[:min([i for i in (rest.find("?"), rest.find("#")) if i >= 0], default=len(rest))].rfind("@")
    start = at + 1 if at >= 0 else 0
    cut = min([i for i in (rest.find("/", start), rest.find("?", start), rest.find("#", start)) if i >= 0],
              default=len(rest))
    authority, tail = ("***@" if at >= 0 else "") + rest[start:cut], rest[cut:]
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        pairs = parse_qsl(query, keep_blank_values=True)
        secret = [any(s in k.lower() for s in _SECRET_QUERY_KEYS) for k, _ in pairs]
        if any(secret):
            query = urlencode([(k, "***" if hidden else v) for (k, v), hidden in zip(pairs, secret)], safe="*")
        tail = f"{path}?{query}{hash_}{fragment}"
    return f"{scheme}://{authority}{tail}"


# MLflow's credential variables (mlflow/environment_variables.py): basic auth, a bearer token, or the name
# of an auth plugin / client certificate. CREDENTIAL_VARS travel to the trials' workers
# (harness/launch/local_ray.py); the values of SECRET_VARS are never shown (redact).
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_TRACKING_INSECURE_TLS",
                   "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH")
SECRET_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_SHORTEST_SECRET = 4   # a shorter value would blank out ordinary words; it is no secret worth the name either
_secrets: set[str] = set()  # passwords taken out of tracking URIs by this process (take_credentials)
URL_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact(text) -> str:
    """`text` (an error message, a status tag, a traceback) as it may be shown or stored: every URL in it
    through redact_uri (user-info -> `***@`, secret query parameters -> `***`), and every known secret
    (the values of MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, passwords taken out of tracking
    URIs, raw and percent-encoded) -> `***`. The one filter for everything ditscale writes or prints
    about a failure: MLflow puts the request URL into its errors ("API request to http://u:pw@... failed")."""
    text = URL_RE.sub(lambda m: redact_uri(m.group()), str(text))
    known = {os.environ.get(k, "") for k in SECRET_VARS} | _secrets
    for secret in sorted(known, key=len, reverse=True):  # longest first: a secret inside another goes with it
        if len(secret) >= _SHORTEST_SECRET:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def take_credentials(uri: str) -> str:
    """`uri` without its user-info; a user name and password found there go to MLflow's own variables
    (MLFLOW_TRACKING_USERNAME / PASSWORD of this process), which every MLflow client reads — the
    REST store and the artifact repositories (mlflow/utils/rest_utils.py, MlflowHostCreds). So the URL
    MLflow builds requests from, and puts into its error messages, holds no secret, and neither does
    anything derived from the URI (trial configs, Ray Tune's config, status tags). The URI's
    credentials win over variables already set, as they did before (requests' URL auth replaced
    MLflow's Authorization header). Ray workers get them from this environment (local_ray.runtime_env)."""
    bare, credentials = split_credentials(uri)
    os.environ.update(credentials)
    return bare


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An HTTP(S) `uri` without its user-info, and that user-info as MLflow's variables
    ({MLFLOW_TRACKING_USERNAME: ..., MLFLOW_TRACKING_PASSWORD: ...}, percent-decoded; {} when none).
    The password is remembered for redact."""
    if not uri or not uri.startswith(("http://", "https://")):
        return uri, {}
    scheme, rest = uri.split("://", 1)
    # The last `@` before any query, as redact_uri reads it: a password with an unescaped `/` is still one.
    at = rest[:min([i for i in (rest.find("?"), rest.find("#")) if i >= 0], default=len(rest))].rfind("@")
    user, colon, password = rest[:max(at, 0)].partition(":")
    if at < 0 or "/" in user:  # no user-info (an `@` in the path)
        return uri, {}
    credentials = {"MLFLOW_TRACKING_USERNAME": unquote(user)} if user else {}
    if colon:
        credentials["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
        _secrets.update({unquote(password), password} - {""})
    return f"{scheme}://{rest[at + 1:]}", credentials


def public_config(dump: dict) -> dict:
    """A trial's or study's config dump (model_dump(mode="json")) as it may be written to a file or MLflow:
    the tracking URI without its credentials (a database URI such as postgresql://user:pw@db keeps its
    password in the URI; HTTP ones were already taken out by take_credentials)."""
    tracking = dump.get("tracking")
    if isinstance(tracking, dict) and tracking.get("uri"):
        tracking["uri"] = redact_uri(tracking["uri"])
    return dump
