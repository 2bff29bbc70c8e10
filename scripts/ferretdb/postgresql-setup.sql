-- Store-specific tuning for FerretDB v1.24 on PostgreSQL, installed by
-- scripts/stack.py into the database FerretDB uses. The service stays plain
-- MongoDB: it creates the single-field indexes a real MongoDB needs, and this
-- file makes FerretDB's copies of them useful.
--
-- FerretDB pushes a top-level equality filter down as
--     _jsonb->'field' @> '<value>'
-- which only a GIN index can serve; the B-tree indexes FerretDB's
-- createIndexes makes never can (and cost insert speed). This event trigger
-- replaces each non-unique B-tree index FerretDB creates on top-level fields
-- with a GIN (jsonb_path_ops) index of the same name on the same fields, and
-- gives every unique _id index a GIN twin, so that `{_id: x}` reads use an
-- index too. Tables FerretDB creates later (a dropped and re-created
-- collection, a new test database) get the same treatment.
SET client_min_messages = warning;

CREATE OR REPLACE FUNCTION public.ferretdb_gin_indexes() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
  cmd record;
  def text;
  idx_name text;
  schema_name text;
  table_name text;
  is_unique boolean;
  fields text[];
  cols text;
BEGIN
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands()
             WHERE command_tag = 'CREATE INDEX' AND object_type = 'index' LOOP
    SELECT pg_get_indexdef(i.indexrelid), c.relname, n.nspname, t.relname, i.indisunique
      INTO def, idx_name, schema_name, table_name, is_unique
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indexrelid
      JOIN pg_class t ON t.oid = i.indrelid
      JOIN pg_namespace n ON n.oid = t.relnamespace
      JOIN pg_am am ON am.oid = c.relam
     WHERE i.indexrelid = cmd.objid AND am.amname = 'btree';
    -- only FerretDB's indexes on top-level fields: "(_jsonb -> 'f'::text)";
    -- dotted paths (#>) are not pushed down by FerretDB anyway
    CONTINUE WHEN def IS NULL OR def !~ '_jsonb -> ' OR def ~ '#>';
    SELECT array_agg(m[1]) INTO fields
      FROM regexp_matches(def, '_jsonb -> ''((?:[^'']|'''')+)''::text', 'g') AS m;
    CONTINUE WHEN fields IS NULL;
    SELECT string_agg(format('(_jsonb -> %L) jsonb_path_ops', replace(f, '''''', '''')), ', ')
      INTO cols FROM unnest(fields) AS f;
    IF is_unique THEN
      IF fields = ARRAY['_id'] THEN
        EXECUTE format('CREATE INDEX %I ON %I.%I USING gin (%s)',
                       left(idx_name, 55) || '_gin', schema_name, table_name, cols);
      END IF;
    ELSE
      EXECUTE format('DROP INDEX %I.%I', schema_name, idx_name);
      EXECUTE format('CREATE INDEX %I ON %I.%I USING gin (%s)',
                     idx_name, schema_name, table_name, cols);
    END IF;
  END LOOP;
END
$fn$;

DROP EVENT TRIGGER IF EXISTS ferretdb_gin_indexes;
CREATE EVENT TRIGGER ferretdb_gin_indexes ON ddl_command_end WHEN TAG IN ('CREATE INDEX')
  EXECUTE FUNCTION public.ferretdb_gin_indexes();
