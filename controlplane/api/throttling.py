from rest_framework.throttling import UserRateThrottle


class UserBurstThrottle(UserRateThrottle):
    """Fairness, not security: 429 with Retry-After when one user floods the API."""

    scope = "user_burst"
