"""Sequence affinity: every request of one sequence reaches the same replica and version.

A stateful model (``sequence_batching``) keeps each sequence's state in the replica that started
it, so the gateway must not balance its requests one by one. For such a model (a replica reports
it ``stateful`` when it registers):

- a Lua filter, ``meshserve.sequence``, reads the request's correlation ID and puts it in the
  ``meshserve-sequence`` header: over gRPC from ``parameters["sequence_id"]`` of a ModelInfer
  message (the protobuf is walked up to field 4, the parameters, which serializers write before
  the inputs and raw contents); over REST from ``"sequence_id"`` in the JSON part of an
  ``/infer`` or ``/generate`` body. An ID is written the same way from both (an integer in
  decimal, a string as it is, or in hex when it holds characters a header value should not), so
  one sequence hashes alike over either. The filter is in every request's chain (the chain is
  made before the body chooses the route) but runs no script by default: the model's routes
  name its script (``LuaPerRoute``, looked up once the route is chosen);
- the routes hash on that header: their version split picks the version from the hash
  (``use_hash_policy``), and the version's cluster picks the replica from a ring (``RING_HASH``)
  whose hosts are keyed by service instance id, the same in the gRPC and the REST cluster.

A request that carries no correlation ID is balanced at random. A bidi stream
(ModelStreamInfer) is routed once, when it opens, and all its requests stay on that replica; a
client may name the sequence to hash on in the ``meshserve-sequence`` header of the stream (or
of any call), which the filter keeps when it finds no ID in the body. When replicas come or go,
the sequences the ring moves find their state missing on the new replica and are refused there
(a request without START for a sequence that is not running), never mixed up.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from google.protobuf import wrappers_pb2

SEQUENCE_FILTER = "meshserve.sequence"
SEQUENCE_HEADER = "meshserve-sequence"
#: how much of a request the filters read looking for the ID (the front of a gRPC message, the
#: JSON part of a REST body)
SCAN_LIMIT = 65536
_SCRIPT = "sequence"

_LUA_COMMON = """\
local HEADER = "%(header)s"
local SCAN_LIMIT = %(limit)d

-- a correlation ID as a header value: printable IDs as they are, others in hex
local function header_value(id)
  if id == "" then return nil end
  if id:find("[^%%w%%-%%._~:]") then
    return "x" .. (id:gsub(".", function(c) return string.format("%%02x", c:byte()) end))
  end
  return id
end
"""

#: gRPC: the ID in a ModelInfer message's ``parameters`` (field 4, map<string, InferParameter>)
GRPC_SOURCE = (
    _LUA_COMMON
    + """
-- The message is read in place (positions into one string, no substrings or tables on the
-- way): this runs on every request to a stateful model.

-- the varint at position i of s (exact up to 2^53: tags and lengths) and the next position;
-- nil at the end of s or past 10 bytes
local function varint(s, i)
  local value, scale = 0, 1
  for j = i, i + 9 do
    local b = s:byte(j)
    if b == nil then return nil, j end
    value = value + (b %% 128) * scale
    if b < 128 then return value, j + 1 end
    scale = scale * 128
  end
  return nil, i + 10
end

-- the varint at position i of s in decimal, exact to 64 bits (Lua numbers are doubles)
local function decimal(s, i)
  local last = i
  while (s:byte(last) or 0) >= 128 and last < i + 9 do last = last + 1 end
  local digits = {0}  -- least significant first
  for j = last, i, -1 do  -- 7-bit groups, most significant first
    local carry = s:byte(j) %% 128
    for d = 1, #digits do
      local x = digits[d] * 128 + carry
      digits[d] = x %% 10
      carry = (x - digits[d]) / 10
    end
    while carry > 0 do
      digits[#digits + 1] = carry %% 10
      carry = (carry - carry %% 10) / 10
    end
  end
  return string.reverse(table.concat(digits))
end

-- InferParameter at [i, last] of s as text: int64_param (2) and uint64_param (5) in decimal,
-- string_param (3) as it is; nil for another kind or 0
local function parameter_text(s, i, last)
  while i <= last do
    local tag
    tag, i = varint(s, i)
    if tag == nil then return nil end
    if tag == 16 or tag == 40 then
      local text = decimal(s, i)
      if text == "0" then return nil end
      return text
    end
    if tag == 26 then
      local len
      len, i = varint(s, i)
      if len == nil then return nil end
      return s:sub(i, i + len - 1)
    end
    local wire = tag %% 8
    if wire == 0 then
      local skipped
      skipped, i = varint(s, i)
    elseif wire == 1 then
      i = i + 8
    elseif wire == 2 then
      local len
      len, i = varint(s, i)
      if len == nil then return nil end
      i = i + len
    else
      return nil
    end
  end
  return nil
end

-- one parameters map entry at [i, last] of s: the ID when its key is "sequence_id", else nil
local function entry_id(s, i, last)
  local is_id, value_at, value_last = false, nil, nil
  while i <= last do
    local tag, len
    tag, i = varint(s, i)
    if tag == nil or tag %% 8 ~= 2 then return nil end
    len, i = varint(s, i)
    if len == nil then return nil end
    if tag == 10 then is_id = len == 11 and s:sub(i, i + 10) == "sequence_id" end
    if tag == 18 then value_at, value_last = i, i + len - 1 end
    i = i + len
  end
  if is_id and value_at ~= nil then return parameter_text(s, value_at, value_last) end
  return nil
end

-- ModelInferRequest: fields 1-7 are all length-delimited; parameters are field 4
local function sequence_id(msg)
  local i, n = 1, #msg
  while i <= n do
    local tag, len
    tag, i = varint(msg, i)
    if tag == nil or tag %% 8 ~= 2 or tag > 34 then return nil end  -- past the parameters
    len, i = varint(msg, i)
    if len == nil or i + len - 1 > n then return nil end  -- cut off by the scan limit
    if tag == 34 then
      local id = entry_id(msg, i, i + len - 1)
      if id ~= nil then return id end
    end
    i = i + len
  end
  return nil
end

-- (an object the handle gave is invalid once body() has waited: headers are asked for again)
function envoy_on_request(handle)
  -- a stream's body never ends while it is open: only unary calls are read
  if handle:headers():get(":path") ~= "/inference.GRPCInferenceService/ModelInfer" then return end
  local body = handle:body()
  if body == nil or body:length() < 5 then return end
  local head = body:getBytes(0, 5)
  if head:byte(1) ~= 0 then return end  -- a compressed message
  local size = ((head:byte(2) * 256 + head:byte(3)) * 256 + head:byte(4)) * 256 + head:byte(5)
  size = math.min(size, body:length() - 5, SCAN_LIMIT)
  local id = sequence_id(body:getBytes(5, size))
  local value = id and header_value(id)
  if value then handle:headers():replace(HEADER, value) end
end
"""
) % {"header": SEQUENCE_HEADER, "limit": SCAN_LIMIT}

#: REST: ``"sequence_id"`` in the JSON part (the whole body, or the first
#: Inference-Header-Content-Length bytes with the binary tensor extension)
HTTP_SOURCE = (
    _LUA_COMMON
    + """
local function wanted(path)
  path = path:gsub("%%?.*$", "")
  return path:find("/infer$") or path:find("/generate$") or path:find("/generate_stream$")
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":method") ~= "POST" or not wanted(headers:get(":path") or "") then return end
  local encoding = headers:get("content-encoding")
  if encoding ~= nil and encoding ~= "identity" then return end
  local json_size = tonumber(headers:get("inference-header-content-length") or "")
  local body = handle:body()
  if body == nil then return end
  local size = json_size or body:length()
  size = math.min(size, body:length(), SCAN_LIMIT)
  local json = body:getBytes(0, size)
  local id = json:match('"sequence_id"%%s*:%%s*(%%d+)')
  if id == "0" then return end  -- no correlation ID
  if id == nil then id = json:match('"sequence_id"%%s*:%%s*"([^"\\\\]*)"') end
  local value = id and header_value(id)
  if value then handle:headers():replace(HEADER, value) end
end
"""
) % {"header": SEQUENCE_HEADER, "limit": SCAN_LIMIT}


def sequence_filter(source: str) -> lua_pb2.Lua:
    """The filter's config: ``source`` (GRPC_SOURCE / HTTP_SOURCE) under the name the routes
    ask for. Its header clears the route cache: a version split picks its cluster when the route
    is chosen, so the route is chosen again with the header there (the same route: the body's
    metadata and the path do not change)."""
    return lua_pb2.Lua(
        source_codes={_SCRIPT: base_pb2.DataSource(inline_string=source)},
        clear_route_cache=wrappers_pb2.BoolValue(value=True),
    )


def make_sticky(route: rc.Route) -> None:
    """Keep a sequence on one version and replica: run the filter's script on ``route`` and
    hash on its header (the version split too, when the route has one)."""
    route.typed_per_filter_config[SEQUENCE_FILTER].Pack(
        lua_pb2.LuaPerRoute(name=_SCRIPT), deterministic=True
    )
    action = route.route
    action.hash_policy.append(
        rc.RouteAction.HashPolicy(
            header=rc.RouteAction.HashPolicy.Header(header_name=SEQUENCE_HEADER)
        )
    )
    if action.HasField("weighted_clusters"):
        action.weighted_clusters.use_hash_policy.CopyFrom(wrappers_pb2.BoolValue(value=True))
