"""Request and response bodies (pydantic): what the API accepts is exactly what the OpenAPI
spec says. Inputs forbid unknown keys; bounds match the database's column types and checks,
so a value the database would refuse is refused here first, with a 422."""

from datetime import datetime
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, Strict, model_validator

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", examples=["web01"])]
# Strict: "300" is not an integer (pydantic's lax mode would take it).
Id = Annotated[int, Strict(), Field(ge=1, le=INT64_MAX)]
Text = Annotated[str, Field(max_length=2000, pattern=r"^[^\x00]*$")]
NetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
MAX_JSON_DEPTH = 8


def _shallow(value: dict) -> dict:
    """Free-form JSON objects (run parameters, step details) nest at most MAX_JSON_DEPTH levels."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_shallow)]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stored(BaseModel):
    id: int
    created_at: datetime
    updated_at: datetime


# -- catalogue ---------------------------------------------------------------------------------

class SiteIn(Input):
    name: Name
    description: Text = ""


class Site(SiteIn, Stored):
    pass


class HypervisorIn(Input):
    name: Name
    site_id: Id
    address: Annotated[str, Field(pattern=r"^[A-Za-z0-9.:-]{1,253}$", description="host name or IP address")]
    engine_url: Annotated[str, Field(pattern=r"^[a-z][a-z0-9+.-]*://[A-Za-z0-9.:\[\]/_-]{1,250}$",
                                     description="tandemd's control endpoint")] | None = None


class Hypervisor(HypervisorIn, Stored):
    pass


class PolicyIn(Input):
    name: Name
    rp_interval_s: Annotated[int, Strict(),
                             Field(ge=1, le=366 * 86400, description="seconds between recovery points")]
    rp_retention: Annotated[int, Strict(), Field(ge=1, le=100_000, description="recovery points kept per VM")]
    sync_timeout_s: Annotated[int, Strict(), Field(ge=0, le=86400, description="tolerated degraded time")]
    priority: Annotated[int, Strict(), Field(ge=0, le=1000)] = 100


class Policy(PolicyIn, Stored):
    pass


class VmIn(Input):
    name: Name
    production_site_id: Id
    dr_site_id: Id
    hypervisor_id: Id | None = None
    policy_id: Id

    @model_validator(mode="after")
    def _two_sites(self):
        if self.production_site_id == self.dr_site_id:
            raise ValueError("production_site_id and dr_site_id must differ")
        return self


class Vm(VmIn, Stored):
    pass


class VolumeIn(Input):
    vm_id: Id
    resource: Name
    volume: Annotated[int, Strict(), Field(ge=0, le=65535)]
    target_dev: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,15}$", examples=["vda"])]
    size_bytes: Annotated[int, Strict(), Field(ge=1, le=INT64_MAX)]


class Volume(VolumeIn, Stored):
    pass


class NetworkMap(Input):
    source: NetName
    target: NetName
    target_cidr: IPv4Network | IPv6Network | None = Field(None, description="re-addressing at the DR site")


class NetworkMappingDoc(Input):
    networks: Annotated[list[NetworkMap], Field(min_length=1, max_length=256)]

    @model_validator(mode="after")
    def _unique_sources(self):
        sources = [n.source for n in self.networks]
        if len(set(sources)) != len(sources):
            raise ValueError("each source network is mapped once")
        return self


class NetworkMappingIn(Input):
    name: Name
    document: NetworkMappingDoc


class NetworkMapping(NetworkMappingIn, Stored):
    pass


class PlanGroup(Input):
    name: Name
    vms: Annotated[list[Name], Field(min_length=1, max_length=500, description="protected VM names")]
    start_delay_s: Annotated[int, Strict(), Field(ge=0, le=3600)] = 0
    wait_for: Literal["running", "guest-agent"] = "running"


class PlanDoc(Input):
    description: Text = ""
    groups: Annotated[list[PlanGroup], Field(min_length=1, max_length=100, description="started in order")]

    @model_validator(mode="after")
    def _each_once(self):
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        vms = [v for g in self.groups for v in g.vms]
        if len(set(vms)) != len(vms):
            raise ValueError("a VM appears in one group only, once")
        return self

    def vm_names(self) -> list[str]:
        return [v for g in self.groups for v in g.vms]


class RecoveryPlanIn(Input):
    name: Name
    network_mapping_id: Id | None = None
    document: PlanDoc


class RecoveryPlan(RecoveryPlanIn, Stored):
    pass


# -- recovery points ---------------------------------------------------------------------------

class RecoveryPointIn(Input):
    vm_id: Id
    site_id: Id
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
    taken_at: AwareDatetime
    consistency: Literal["crash", "filesystem"]


class RecoveryPoint(BaseModel):
    id: int
    vm_id: int
    site_id: int
    name: str
    taken_at: datetime
    consistency: str
    reported_at: datetime
    reported_by: str


# -- runs --------------------------------------------------------------------------------------

# Caller-given keys (migration 0004): recording a run or a step again under its key is a no-op.
Key = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", examples=["drill-web-1"])]


class RunIn(Input):
    kind: Literal["failover", "failback", "drill"]
    plan_id: Id | None = None
    parameters: JsonObject = {}
    key: Key | None = Field(None, description="unique; creating a run with a known key returns it (200)")
    series: Key | None = Field(None, description="groups the runs of one operation and plan (resuming)")


class StepIn(Input):
    key: Key | None = Field(None, description="unique in the run; appending a known key returns it (200)")
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
    status: Literal["ok", "changed", "skipped", "failed"]
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    detail: JsonObject = {}


class RunFinish(Input):
    state: Literal["succeeded", "failed", "aborted"]
    result: JsonObject = {}


class Step(BaseModel):
    id: int
    seq: int
    key: str | None = None
    name: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    detail: dict[str, Any]
    recorded_at: datetime


class Run(BaseModel):
    id: int
    key: str | None = None
    series: str | None = None
    kind: str
    plan_id: int | None
    state: str
    parameters: dict[str, Any]
    result: dict[str, Any] | None
    started_by: str
    started_at: datetime
    finished_at: datetime | None
    steps: list[Step] = []


# -- alerts, audit, tokens ---------------------------------------------------------------------

class Alert(BaseModel):
    id: int
    dedup_key: str
    kind: str
    severity: str
    state: str
    subject: str
    details: dict[str, Any]
    raised_at: datetime
    last_seen_at: datetime
    acked_at: datetime | None
    acked_by: str | None
    cleared_at: datetime | None


class AuditEntry(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    inputs: Any
    ok: bool
    result: Any


class TokenIn(Input):
    name: Name
    role: Literal["read-only", "operator", "admin"]


class Token(BaseModel):
    id: int
    name: str
    role: str
    created_by: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class NewToken(Token):
    token: str = Field(description="shown once: only its SHA-256 is kept")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
