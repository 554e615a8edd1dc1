-- Most events update an existing instance without touching an indexed column (health
-- transitions, weight, isolation). Leaving free space in each page lets PostgreSQL do those as
-- heap-only tuple (HOT) updates, which skip index maintenance entirely. Applies to pages written
-- from now on.
ALTER TABLE instance SET (fillfactor = 85);
ALTER TABLE health_check SET (fillfactor = 85);
