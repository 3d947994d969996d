"""factory_boy factories for the fast test layer: plain rows, no services, no reconcile."""

from __future__ import annotations

import factory
import ray

from clusters.choices import ClusterStatus, NodeRole, NodeState
from clusters.models import Cluster, Node, NodeGroup
from controlplane.choices import Role
from controlplane.models import Membership, User, Workspace


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        django_get_or_create = ("email",)

    email = factory.Sequence(lambda n: f"user{n}@example.com")
    username = factory.SelfAttribute("email")
    password = factory.django.Password("pw")


class WorkspaceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Workspace

    slug = factory.Sequence(lambda n: f"ws-{n}")
    name = factory.LazyAttribute(lambda o: o.slug.title())


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    workspace = factory.SubFactory(WorkspaceFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.MEMBER


class ClusterFactory(factory.django.DjangoModelFactory):
    """A cluster with its worker groups: `groups=[{"name": "cpu", "min_workers": 1, ...}]`."""

    class Meta:
        model = Cluster
        skip_postgeneration_save = True

    workspace = factory.SubFactory(WorkspaceFactory)
    name = factory.Sequence(lambda n: f"cluster-{n}")
    provider = "local"
    head_instance_type = "local.small"
    runtime = factory.LazyFunction(lambda: {"ray_version": ray.__version__, "pip": [], "env": {}})
    status = ClusterStatus.PENDING

    @factory.post_generation
    def groups(self, create: bool, extracted: list[dict] | None, **kwargs: object) -> None:
        if not create:
            return
        specs = [{"name": "cpu", "min_workers": 1, "max_workers": 4}] if extracted is None else extracted
        for position, spec in enumerate(specs):
            NodeGroupFactory(cluster=self, position=position, **spec)


class NodeGroupFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = NodeGroup

    cluster = factory.SubFactory(ClusterFactory, groups=[])
    name = "cpu"
    instance_type = "local.small"
    min_workers = 0
    max_workers = 4
    target_workers = factory.LazyAttribute(lambda o: o.min_workers)


class NodeFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Node

    cluster = factory.SubFactory(ClusterFactory)
    role = NodeRole.WORKER
    group_name = factory.LazyAttribute(lambda o: "head" if o.role == NodeRole.HEAD else "cpu")
    group = factory.LazyAttribute(
        lambda o: None if o.role == NodeRole.HEAD else o.cluster.groups.filter(name=o.group_name).first()
    )
    name = factory.Sequence(lambda n: f"node-{n}")
    instance_type = "local.small"
    state = NodeState.REQUESTED
