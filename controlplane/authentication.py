"""Bearer-token authentication for users (API tokens)."""

from __future__ import annotations

from django.utils import timezone
from rest_framework import authentication, exceptions

from controlplane.models import TOKEN_PREFIX, ApiToken, hash_token


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer cu_…`. Tokens are looked up by SHA-256 and compared in constant time."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        raw = raw.strip()
        if not raw.startswith(TOKEN_PREFIX):
            return None  # another kind of bearer token (node tokens have their own authenticator)
        # get(), not first(): token_hash is unique, and the ORDER BY that first() adds cost about a tenth of
        # a millisecond to build, on every request.
        try:
            token = ApiToken.objects.select_related("user").get(token_hash=hash_token(raw))
        except ApiToken.DoesNotExist:
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        if not token.matches(raw):
            raise exceptions.AuthenticationFailed("Invalid token.")
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This token has been revoked.")
        if token.expires_at is not None and token.expires_at <= timezone.now():
            raise exceptions.AuthenticationFailed("This token has expired.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("This account is disabled.")
        now = timezone.now()
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request) -> str:
        return self.keyword
