-- tbc-integrations: every ledger verb as one atomic server-side script.
-- ARGV: namespace, verb, now, payload (JSON). All keys share the hash tag {namespace},
-- so a namespace lives in one Redis Cluster slot. Returns JSON:
-- {"result": ..., "error": {...} or absent, "events": [...]}.
local ns, verb, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local p = cjson.decode(ARGV[4])
local P = 'tbc:{' .. ns .. '}:'
local events, cache, dirty = {}, {}, {}
local NUM = {'priority','min_reserve','allocated','consumed','consumed_in','consumed_out',
  'reserved','reserved_in','reserved_out','borrowed','lent','refusals','complete'}
local OPT = {'max_input','max_output','threshold','last_confidence'}

local function str(v)
  -- redis.call takes strings: JSON null and nil become '', numbers keep every digit
  if v == nil or v == cjson.null then return '' end
  if type(v) == 'number' then return string.format('%.17g', v) end
  if type(v) == 'boolean' then return v and '1' or '0' end
  return tostring(v)
end
local function opt(v) if v == cjson.null then return nil end return v end

local FIELDS = {'priority','min_reserve','allocated','consumed','consumed_in','consumed_out',
  'reserved','reserved_in','reserved_out','borrowed','lent','refusals','complete',
  'max_input','max_output','threshold','last_confidence','max_tokens'}
local function load(name)
  local a = cache[name]
  if a then return a end
  local raw = redis.call('HMGET', P .. 'agent:' .. name, unpack(FIELDS))
  if not raw[1] then return nil end
  a = {name = name}
  local orig = {}
  for i, f in ipairs(FIELDS) do
    local v = raw[i]
    if v == false or v == '' then a[f] = nil else a[f] = tonumber(v) end
    orig[f] = a[f]
  end
  a.orig = orig
  cache[name] = a
  return a
end
local function need_agent(name)
  local a = load(name)
  if not a then error({unknown = name}) end
  return a
end
local function avail(a) return a.allocated - a.consumed - a.reserved end
local function spare(a) if a.complete == 1 then return avail(a) end return avail(a) - a.min_reserve end
local function touch(a) dirty[a.name] = a end
local function gated(a) return a.threshold ~= nil and a.last_confidence ~= nil and a.last_confidence >= a.threshold end
local function ev(kind, agent, t)
  if not p.ev then return end  -- nobody listens: build no events
  t = t or {}
  t.kind, t.agent, t.time, t.namespace = kind, agent, now, ns
  t.tokens = t.tokens or 0
  t.input_tokens = t.input_tokens or 0
  t.output_tokens = t.output_tokens or 0
  t.reason = t.reason or ''
  if t.estimated == nil then t.estimated = false end
  table.insert(events, t)
end
local SAVED = {'allocated','consumed','consumed_in','consumed_out','reserved','reserved_in',
  'reserved_out','borrowed','lent','refusals','complete','threshold','last_confidence'}
local function save()
  for name, a in pairs(dirty) do
    local o = a.orig
    local args = {}
    for _, f in ipairs(SAVED) do
      if a[f] ~= o[f] then
        table.insert(args, f)
        table.insert(args, str(a[f]))
      end
    end
    if #args > 0 then redis.call('HSET', P .. 'agent:' .. name, unpack(args)) end
    -- the donor index only moves when remaining, reserve eligibility or completion does
    local was = (o.allocated or 0) - (o.consumed or 0) - (o.reserved or 0)
    if avail(a) ~= was or a.complete ~= o.complete or o.fresh then
      local level = P .. 'don:p' .. a.priority
      if a.complete == 1 then redis.call('ZREM', level, name) end
      local key = (a.complete == 1) and (P .. 'don:done') or level
      if spare(a) > 0 then redis.call('ZADD', key, str(-avail(a)), name) else redis.call('ZREM', key, name) end
    end
    for _, f in ipairs(SAVED) do o[f] = a[f] end
  end
end
local function protected(a)
  if a.consumed ~= 0 or a.reserved ~= 0 then return false end
  for _, dep in ipairs(redis.call('SMEMBERS', P .. 'dependents:' .. a.name)) do
    local d = load(dep)
    if d and d.complete ~= 1 then return true end
  end
  return false
end

-- donors in the design's order: completed first, then lowest priority, then most remaining
local function plan(needy, need, partial)
  local bound = need
  if p.policy == 'weighted' then
    local top = redis.call('ZRANGE', P .. 'levels', -1, -1)
    local maxp = tonumber(top[1] or needy.priority)
    if needy.priority > maxp then maxp = needy.priority end
    local deficit = 1.0
    if needy.threshold ~= nil then
      deficit = needy.threshold - (needy.last_confidence or 0.0)
      if deficit < 0 then deficit = 0 end
    end
    local imax = needy.max_input or needy.max_tokens
    local b = math.ceil(p.alpha * (needy.priority / maxp) * deficit * imax - 1e-9)
    if b < bound then bound = b end
  end
  local out, found = {}, 0
  if bound <= 0 then return out, found end
  local keys = {P .. 'don:done'}
  for _, lv in ipairs(redis.call('ZRANGEBYSCORE', P .. 'levels', '-inf', str(needy.priority))) do
    table.insert(keys, P .. 'don:p' .. lv)
  end
  for _, key in ipairs(keys) do
    local start = 0
    while found < bound do
      local names = redis.call('ZRANGE', key, start, start + 15)
      if #names == 0 then break end
      start = start + 16
      for _, name in ipairs(names) do
        if name ~= needy.name then
          local d = load(name)
          local s = spare(d)
          if s > 0 and (d.complete == 1 or not protected(d)) then
            local take = math.min(s, bound - found)
            table.insert(out, {d, take})
            found = found + take
            if found >= bound then break end
          end
        end
      end
    end
    if found >= bound then break end
  end
  return out, found
end
local function apply(needy, pl)
  for _, pair in ipairs(pl) do
    local d, t = pair[1], pair[2]
    d.allocated = d.allocated - t; d.lent = d.lent + t
    needy.allocated = needy.allocated + t; needy.borrowed = needy.borrowed + t
    touch(d)
  end
  touch(needy)
end
local function pairs_of(pl) local o = {} for _, x in ipairs(pl) do table.insert(o, {x[1].name, x[2]}) end return o end

local function unhold(agent, inp, outp, loans)
  local a = need_agent(agent)
  a.reserved = a.reserved - inp - outp; a.reserved_in = a.reserved_in - inp; a.reserved_out = a.reserved_out - outp
  for _, l in ipairs(loans) do
    local d = need_agent(l[1])
    a.allocated = a.allocated - l[2]; a.borrowed = a.borrowed - l[2]
    d.allocated = d.allocated + l[2]; d.lent = d.lent - l[2]
    touch(d)
  end
  touch(a)
end
-- a reservation is one JSON string: {agent, input, output, expires, loans, state}
local SETTLED_TTL = 86400  -- a settled id is remembered a day, so a retried settle is refused
local function getres(rid)
  local raw = redis.call('GET', P .. 'res:' .. rid)
  if not raw then return {} end
  return cjson.decode(raw)
end
local function putres(rid, h, ttl)
  if ttl then
    redis.call('SET', P .. 'res:' .. rid, cjson.encode(h), 'EX', ttl)
  else
    redis.call('SET', P .. 'res:' .. rid, cjson.encode(h))
  end
end
local function sweep()
  local due = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', str(now))
  for _, rid in ipairs(due) do
    local h = getres(rid)
    redis.call('ZREM', P .. 'leases', rid)
    if h.state == 'open' then
      local inp, outp, loans = h.input, h.output, h.loans
      if type(loans) ~= 'table' then loans = {} end
      unhold(h.agent, inp, outp, loans)
      h.state = 'expired'
      putres(rid, h, SETTLED_TTL)
      ev('expire', h.agent, {tokens = inp + outp, input_tokens = inp, output_tokens = outp,
        reservation_id = rid, donors = loans, reason = 'lease'})
    end
  end
  return #due
end
local function settle_overdraft(a, rid)
  local short = -avail(a)
  if short <= 0 then return 0 end
  local pl, found = plan(a, short, true)
  apply(a, pl)
  if #pl > 0 then ev('transfer', a.name, {tokens = found, reservation_id = rid, donors = pairs_of(pl), reason = 'overdraft'}) end
  local left = short - found
  if left > 0 then ev('overdraft', a.name, {tokens = left, reservation_id = rid}) end
  return left
end

local result, err = nil, nil
local ok, e = pcall(function()
  if verb == 'register' then
    local c = p.contract
    local key = P .. 'agent:' .. c.agent_name
    local existing = redis.call('HGET', key, 'contract')
    if existing then
      result = {created = false, contract = existing}
      return
    end
    redis.call('HSET', key, 'contract', p.contract_json, 'priority', str(c.priority),
      'min_reserve', str(c.min_reserve), 'max_input', str(c.max_input_tokens),
      'max_output', str(c.max_output_tokens), 'threshold', str(c.confidence_threshold),
      'allocated', str(c.max_tokens), 'consumed', '0', 'consumed_in', '0', 'consumed_out', '0',
      'reserved', '0', 'reserved_in', '0', 'reserved_out', '0', 'borrowed', '0', 'lent', '0',
      'refusals', '0', 'last_confidence', '', 'complete', '0', 'max_tokens', str(c.max_tokens))
    local order = redis.call('INCR', P .. 'seq')
    redis.call('ZADD', P .. 'agents', order, c.agent_name)
    redis.call('ZADD', P .. 'levels', str(c.priority), str(c.priority))
    for _, dep in ipairs(c.depends_on or {}) do redis.call('SADD', P .. 'dependents:' .. dep, c.agent_name) end
    local a = load(c.agent_name)
    a.orig.fresh = true  -- index a new agent
    touch(a)
    ev('register', c.agent_name, {tokens = c.max_tokens, contract = c})
    result = {created = true}
    return
  end
  if verb == 'status' or verb == 'contracts' or verb == 'open' then
    local names = redis.call('ZRANGE', P .. 'agents', 0, -1)
    local rows = {}
    if verb == 'open' then
      for _, rid in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do
        local h = getres(rid)
        h.id = rid
        if h.state == 'open' then table.insert(rows, h) end
      end
    else
      for _, name in ipairs(names) do
        local r = redis.call('HGETALL', P .. 'agent:' .. name)
        local h = {name = name}
        for i = 1, #r, 2 do h[r[i]] = r[i + 1] end
        table.insert(rows, h)
      end
    end
    result = rows
    return
  end
  if verb == 'expire' then result = sweep(); save(); return end
  sweep()
  if verb == 'reserve' or verb == 'check' then
    local a = need_agent(p.agent)
    local inp, outp = p.input, p.output
    if p.clamp and a.max_output ~= nil then
      local left = a.max_output - a.consumed_out - a.reserved_out
      if left > 0 and left < outp then outp = left end
    end
    local amount = inp + outp
    local av = avail(a)
    local refusal = nil
    if gated(a) then
      refusal = {type = 'gate', requested = amount, available = math.max(av, 0), confidence = a.last_confidence, threshold = a.threshold, reason = 'confidence gate'}
    elseif a.max_input ~= nil and a.consumed_in + a.reserved_in + inp > a.max_input then
      refusal = {type = 'budget', requested = inp, available = math.max(a.max_input - a.consumed_in - a.reserved_in, 0), reason = 'input cap'}
    elseif a.max_output ~= nil and a.consumed_out + a.reserved_out + outp > a.max_output then
      refusal = {type = 'budget', requested = outp, available = math.max(a.max_output - a.consumed_out - a.reserved_out, 0), reason = 'output cap'}
    end
    local loans = {}
    if refusal == nil and amount > av then
      local need = amount - av
      local pl, found = plan(a, need, false)
      if found < need then
        refusal = {type = 'budget', requested = amount, available = math.max(av, 0) + found, reason = 'budget'}
      elseif verb == 'reserve' then
        apply(a, pl)
        loans = pairs_of(pl)
      end
    end
    if refusal ~= nil then
      a.refusals = a.refusals + 1
      touch(a)
      ev('refuse', p.agent, {tokens = amount, input_tokens = inp, output_tokens = outp, reason = refusal.reason})
      err = refusal
      err.agent = p.agent
      return
    end
    if verb == 'check' then return end
    a.reserved = a.reserved + amount; a.reserved_in = a.reserved_in + inp; a.reserved_out = a.reserved_out + outp
    touch(a)
    local rid = p.id
    local expires = now + p.lease
    putres(rid, {agent = p.agent, input = inp, output = outp, expires = expires, loans = loans, state = 'open'})
    redis.call('ZADD', P .. 'leases', str(expires), rid)
    if #loans > 0 then
      local total = 0
      for _, l in ipairs(loans) do total = total + l[2] end
      ev('transfer', p.agent, {tokens = total, reservation_id = rid, donors = loans, reason = 'borrow'})
    end
    ev('reserve', p.agent, {tokens = amount, input_tokens = inp, output_tokens = outp, reservation_id = rid, donors = loans})
    result = {id = rid, input = inp, output = outp, expires = expires, loans = loans}
    return
  end
  if verb == 'commit' or verb == 'release' then
    local h = getres(p.id)
    if h.state == nil or h.state == 'settled' then
      err = {type = 'settled', known = h.state ~= nil}
      return
    end
    putres(p.id, {state = 'settled'}, SETTLED_TTL)
    if h.state == 'open' then redis.call('ZREM', P .. 'leases', p.id) end
    local inp, outp, loans = h.input, h.output, h.loans
    if type(loans) ~= 'table' then loans = {} end
    if verb == 'release' then
      if h.state == 'open' then
        unhold(h.agent, inp, outp, loans)
        ev('release', h.agent, {tokens = inp + outp, input_tokens = inp, output_tokens = outp, reservation_id = p.id, donors = loans})
      end
      return
    end
    local a = need_agent(h.agent)
    local ui, uo = p.ui, p.uo
    local used = ui + uo
    if h.state == 'expired' then
      a.consumed = a.consumed + used; a.consumed_in = a.consumed_in + ui; a.consumed_out = a.consumed_out + uo
      touch(a)
      ev('commit', h.agent, {tokens = used, input_tokens = ui, output_tokens = uo, reservation_id = p.id, donors = loans, reason = 'late', estimated = p.estimated})
      result = settle_overdraft(a, p.id)
      return
    end
    local amount = inp + outp
    a.reserved = a.reserved - amount; a.reserved_in = a.reserved_in - inp; a.reserved_out = a.reserved_out - outp
    a.consumed = a.consumed + used; a.consumed_in = a.consumed_in + ui; a.consumed_out = a.consumed_out + uo
    touch(a)
    ev('commit', h.agent, {tokens = used, input_tokens = ui, output_tokens = uo, reservation_id = p.id, donors = loans, estimated = p.estimated})
    if used <= amount then
      local unused = amount - used
      for i = #loans, 1, -1 do
        if unused <= 0 then break end
        local back = math.min(loans[i][2], unused)
        local d = need_agent(loans[i][1])
        a.allocated = a.allocated - back; a.borrowed = a.borrowed - back
        d.allocated = d.allocated + back; d.lent = d.lent - back
        unused = unused - back
        touch(d)
        ev('transfer', d.name, {tokens = back, reservation_id = p.id, donors = {{a.name, back}}, reason = 'return'})
      end
      result = 0
      return
    end
    result = settle_overdraft(a, p.id)
    return
  end
  if verb == 'charge' then
    local a = need_agent(p.agent)
    local used = p.ui + p.uo
    a.consumed = a.consumed + used; a.consumed_in = a.consumed_in + p.ui; a.consumed_out = a.consumed_out + p.uo
    touch(a)
    ev('commit', p.agent, {tokens = used, input_tokens = p.ui, output_tokens = p.uo, reason = 'direct', estimated = p.estimated})
    result = settle_overdraft(a, nil)
    return
  end
  if verb == 'reallocate' then
    local a = need_agent(p.agent)
    if p.tokens <= 0 then result = 0 return end
    local pl, found = plan(a, p.tokens, true)
    apply(a, pl)
    if #pl > 0 then ev('transfer', p.agent, {tokens = found, donors = pairs_of(pl), reason = 'reallocate'}) end
    result = found
    return
  end
  if verb == 'adjust' then
    local a = need_agent(p.agent)
    if p.delta < 0 and -p.delta > avail(a) then
      err = {type = 'budget', agent = p.agent, requested = -p.delta, available = math.max(avail(a), 0), reason = 'revocation'}
      return
    end
    a.allocated = a.allocated + p.delta
    touch(a)
    ev('transfer', p.agent, {tokens = p.delta, reason = 'grant'})
    return
  end
  if verb == 'complete' then
    local a = need_agent(p.agent)
    if a.complete == 1 then return end
    a.complete = 1
    touch(a)
    ev('complete', p.agent, {tokens = math.max(avail(a), 0)})
    return
  end
  if verb == 'confidence' or verb == 'threshold' then
    local a = need_agent(p.agent)
    local before = gated(a)
    if verb == 'confidence' then a.last_confidence = opt(p.value) else a.threshold = opt(p.value) end
    local after = gated(a)
    touch(a)
    if verb == 'confidence' then
      ev('confidence', p.agent, {confidence = p.value})
      if before ~= after then
        ev('gate', p.agent, {reason = after and 'closed' or 'opened', confidence = p.value, threshold = a.threshold})
      end
    else
      local reason = 'threshold'
      if before ~= after then reason = after and 'closed' or 'opened' end
      ev('gate', p.agent, {reason = reason, confidence = a.last_confidence, threshold = p.value})
    end
    result = after
    return
  end
  error({unknown_verb = verb})
end)
if not ok then
  if type(e) == 'table' and e.unknown then
    save()  -- leases swept before the error still count
    return cjson.encode({error = {type = 'unknown', agent = e.unknown}, events = events})
  end
  error(e)
end
save()
return cjson.encode({result = result, error = err, events = events})
