-- One round trip for a cache read: the company's and the namespace's generations, and the value stored
-- under them. KEYS[1]: company generation key; KEYS[2]: namespace generation key.
-- ARGV[1]: the value's base key; the value lives at ARGV[1] .. ':g' .. company_gen .. '.' .. namespace_gen.
-- Returns {company_gen, namespace_gen, value or nil}; the caller stores a miss under the same generations,
-- so a value loaded across an invalidation lands under a generation nobody reads any more.
local company_gen = redis.call('GET', KEYS[1]) or '0'
local namespace_gen = redis.call('GET', KEYS[2]) or '0'
return {company_gen, namespace_gen, redis.call('GET', ARGV[1] .. ':g' .. company_gen .. '.' .. namespace_gen)}
