-- A script action names a script of the service's scripts folder (DR_FAILOVER_SCRIPTS_DIR)
-- instead of carrying a path: an existing action keeps its file's base name (characters outside
-- [A-Za-z0-9._-] become '_'); the script must then be installed in the scripts folder.

CREATE FUNCTION pg_temp.script_names(actions jsonb) RETURNS jsonb AS $$
    SELECT coalesce(jsonb_agg(
        (a - 'path') || jsonb_build_object(
            'script',
            CASE WHEN a->>'path' IS NULL THEN a->'script'
                 ELSE to_jsonb(replace(
                     regexp_replace(regexp_replace(a->>'path', '^.*/', ''), '[^A-Za-z0-9._-]', '_', 'g'),
                     '..', '__'))
            END)
        ORDER BY n), '[]'::jsonb)
    FROM jsonb_array_elements(coalesce(actions, '[]'::jsonb)) WITH ORDINALITY AS t(a, n)
$$ LANGUAGE sql;

UPDATE recovery_plans SET groups = (
    SELECT coalesce(jsonb_agg(
        g || jsonb_build_object(
            'pre_actions', pg_temp.script_names(g->'pre_actions'),
            'post_actions', pg_temp.script_names(g->'post_actions'))
        ORDER BY n), '[]'::jsonb)
    FROM jsonb_array_elements(groups) WITH ORDINALITY AS t(g, n)
);

DROP FUNCTION pg_temp.script_names(jsonb);
