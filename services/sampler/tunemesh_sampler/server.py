"""gRPC servicer of tunemesh.internal.v1.SamplerService: decode, call core, encode."""

from __future__ import annotations

from tunemesh_internal.v1 import sampler_pb2, sampler_pb2_grpc
from tunemesh.errors import UnavailableError
from tunemesh_common.service.rpc import LeaderFence
from tunemesh_sampler import convert
from tunemesh_sampler.core import SamplerCore


class SamplerServicer(sampler_pb2_grpc.SamplerServiceServicer):
    """Registered before the server starts; answers UNAVAILABLE LOADING until `attach`."""

    def __init__(self, node_id: str, address: str, max_adapters: int, metrics_url: str = "") -> None:
        self._core: SamplerCore | None = None
        self._node_id, self._address, self._max_adapters = node_id, address, max_adapters
        self._metrics_url = metrics_url
        self.leader = LeaderFence()  # refuses calls of a deposed scheduler

    def attach(self, core: SamplerCore) -> None:
        self._core = core

    @property
    def core(self) -> SamplerCore:
        if self._core is None:
            raise UnavailableError("LOADING", f"sampler {self._node_id} is still loading its engine")
        return self._core

    def node(self) -> sampler_pb2.SamplerNode:
        return sampler_pb2.SamplerNode(
            node_id=self._node_id,
            address=self._address,
            models=[convert.supported_model(self.core.info)],
            resident_adapters=self.core.adapters.resident(),
            max_adapters=self._max_adapters,
            active_requests=self.core.active_requests,
            metrics_url=self._metrics_url,
        )

    async def GetSamplerInfo(self, request, context):
        return sampler_pb2.GetSamplerInfoResponse(node=self.node())

    async def Sample(self, request, context):
        self.leader.check(context)
        sequences, prompt_logprobs = await self.core.sample_and_score(
            request.adapter.tenant, convert.adapter_ref(request.adapter), tuple(request.prompt_tokens),
            request.num_samples, convert.spec(request.sampling_params), score_prompt=request.prompt_logprobs,
        )
        return sampler_pb2.SampleResponse(sequences=[convert.sequence(s) for s in sequences],
                                          prompt_logprobs=prompt_logprobs)

    async def ComputeLogprobs(self, request, context):
        self.leader.check(context)
        logprobs = await self.core.compute_logprobs(
            request.adapter.tenant, convert.adapter_ref(request.adapter), tuple(request.prompt_tokens))
        return sampler_pb2.ComputeLogprobsResponse(logprobs=logprobs)
