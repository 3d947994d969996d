"""OpenAPI helpers: every error response is declared with the contract's shape."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerExtension
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class ErrorDetail(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    fields = serializers.DictField(child=serializers.JSONField(), help_text="Per-field messages (400 only).")


class ErrorEnvelope(serializers.Serializer):
    error = ErrorDetail()


ERRORS = {
    400: "Validation error (of the body or of a query parameter such as page_size); `fields` holds the messages.",
    401: "No token, or the token is invalid, expired or revoked.",
    403: "Your role in this workspace is too low.",
    404: "Not found (or in a workspace you do not belong to, or a page past the end).",
    409: "The object's state does not allow this.",
    413: "The body is larger than the limit.",
    429: "Too many requests; retry after the Retry-After header.",
}


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """Responses for these error codes, plus 429 which any authenticated endpoint can return."""
    wanted = sorted({*codes, 429})
    return {code: OpenApiResponse(ErrorEnvelope, description=ERRORS[code]) for code in wanted}


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """User API tokens (`Authorization: Bearer cu_…`)."""

    target_class = "controlplane.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API token: `cu_…`."}


class NodeTokenScheme(OpenApiAuthenticationExtension):
    """Node tokens of the agent API (`Authorization: Bearer cun_…`), one node each."""

    target_class = "clusters.agent_api.views.NodeTokenAuthentication"
    name = "nodeAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A node token: `cun_…`, for its own node only."}


class StrictSerializerSchema(OpenApiSerializerExtension):
    """Strict inputs refuse unknown keys (controlplane.api.fields); say so in the schema."""

    target_class = "controlplane.api.fields.StrictSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_basic_serializer(self.target, direction)
        schema["additionalProperties"] = False
        return schema
