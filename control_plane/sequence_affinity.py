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
-- a varint at position i of s: its 7-bit groups, least significant first, and the next position
local function varint(s, i)
  local groups = {}
  while true do
    local b = s:byte(i)
    if b == nil or #groups == 10 then return nil, i end
    groups[#groups + 1] = b %% 128
    i = i + 1
    if b < 128 then return groups, i end
  end
end

local function small(groups)
  local v, scale = 0, 1
  for _, g in ipairs(groups) do v = v + g * scale; scale = scale * 128 end
  return v
end

-- an unsigned varint in decimal, exact to 64 bits (Lua numbers are doubles)
local function decimal(groups)
  local digits = {0}  -- least significant first
  for k = #groups, 1, -1 do
    local carry = groups[k]
    for d = 1, #digits do
      local x = digits[d] * 128 + carry
      digits[d] = x %% 10
      carry = math.floor(x / 10)
    end
    while carry > 0 do digits[#digits + 1] = carry %% 10; carry = math.floor(carry / 10) end
  end
  local out = {}
  for d = #digits, 1, -1 do out[#out + 1] = tostring(digits[d]) end
  return table.concat(out)
end

-- the length-delimited fields of message s: calls visit(field, first, last) for each, stops
-- when visit returns true or at a field of another wire type
local function each_bytes_field(s, visit)
  local i, n = 1, #s
  while i <= n do
    local tag, len
    tag, i = varint(s, i)
    if tag == nil then return end
    tag = small(tag)
    if tag %% 8 ~= 2 then return end
    len, i = varint(s, i)
    if len == nil then return end
    len = small(len)
    if visit(math.floor(tag / 8), i, i + len - 1) then return end
    i = i + len
  end
end

-- InferParameter: int64_param = 2, uint64_param = 5 (varints), string_param = 3
local function parameter_text(p)
  local i = 1
  while i <= #p do
    local tag
    tag, i = varint(p, i)
    if tag == nil then return nil end
    tag = small(tag)
    local field, wire = math.floor(tag / 8), tag %% 8
    if wire == 0 then
      local v
      v, i = varint(p, i)
      if v == nil then return nil end
      if field == 2 or field == 5 then
        local text = decimal(v)
        if text == "0" then return nil end
        return text
      end
    elseif wire == 2 then
      local len
      len, i = varint(p, i)
      if len == nil then return nil end
      len = small(len)
      if field == 3 then return p:sub(i, i + len - 1) end
      i = i + len
    elseif wire == 1 then
      i = i + 8
    else
      return nil
    end
  end
  return nil
end

local function sequence_id(msg)
  local found
  each_bytes_field(msg, function(field, first, last)
    if last > #msg then return true end  -- cut off by the scan limit
    if field > 4 then return true end    -- past the parameters
    if field == 4 then
      local key, value
      each_bytes_field(msg:sub(first, last), function(f, a, b)
        if f == 1 then key = msg:sub(first + a - 1, first + b - 1) end
        if f == 2 then value = msg:sub(first + a - 1, first + b - 1) end
      end)
      if key == "sequence_id" and value ~= nil then
        found = parameter_text(value)
        return true
      end
    end
    return false
  end)
  return found
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
