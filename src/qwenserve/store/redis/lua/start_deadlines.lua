-- Ends the QUEUED jobs whose start deadline passed (the purge loop's sweep, so an idle cluster
-- ends them too). KEYS: none; ARGV: prefix, now, batch size. Returns how many it handled and
-- the events appended.
return {end_missed_starts(ARGV[2], tonumber(ARGV[3])), announced}
