
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <pthread.h>
#include <lmdb.h>

#include "ngx_http_token_meter_store.h"


#define NGX_HTTP_TOKEN_METER_MIN_MAP_SIZE  (1024 * 1024)


struct ngx_http_token_meter_store_s {
    ngx_str_t                   path;
    size_t                      map_size;
    ngx_msec_t                  sync;
    MDB_env                    *env;
    MDB_dbi                     dbi[NGX_HTTP_TOKEN_METER_DB_N];
    ngx_log_t                  *log;
    time_t                      full_logged;

    /* a read transaction kept reset between uses */
    MDB_txn                    *reader;

    /* the thread that flushes the map with sync=<time> */
    pthread_t                   syncer;
    pthread_mutex_t             sync_mutex;
    pthread_cond_t              sync_cond;
    int                         sync_error;
    unsigned                    sync_wanted:1;
    unsigned                    sync_stop:1;
    unsigned                    syncer_running:1;
};


struct ngx_http_token_meter_txn_s {
    MDB_txn                    *txn;
    ngx_http_token_meter_store_t  *store;
    ngx_log_t                  *log;
    ngx_uint_t                  write;
};


struct ngx_http_token_meter_cursor_s {
    MDB_cursor                 *cursor;
    ngx_http_token_meter_txn_t *txn;
};


static ngx_int_t ngx_http_token_meter_store_env(
    ngx_http_token_meter_store_t *store, ngx_log_t *log, char **err);
static char *ngx_http_token_meter_store_init_schema(
    ngx_http_token_meter_store_t *store, ngx_conf_t *cf);
static ngx_int_t ngx_http_token_meter_store_conf_env(
    ngx_http_token_meter_store_t *store, ngx_conf_t *cf);
static ngx_int_t ngx_http_token_meter_store_probe(
    ngx_http_token_meter_store_t *store, ngx_conf_t *cf);
static void ngx_http_token_meter_store_walk(
    ngx_http_token_meter_store_t *store);
static ngx_int_t ngx_http_token_meter_store_failed(
    ngx_http_token_meter_txn_t *txn, const char *call, int rc);
static void ngx_http_token_meter_syncer_start(
    ngx_http_token_meter_store_t *store, ngx_log_t *log);
static void ngx_http_token_meter_syncer_stop(
    ngx_http_token_meter_store_t *store);
static void *ngx_http_token_meter_syncer(void *data);


static char *ngx_http_token_meter_db_names[] = {
    "meta",
    "subscribers",
    "keys",
    "key_ids",
    "msisdns",
    "trials",
    "grants",
    "reservations",
    "purchases",
    "usage",
    "usage_time",
    "usage_subscriber",
    "counters",
    NULL
};


ngx_http_token_meter_store_t *
ngx_http_token_meter_store_create(ngx_pool_t *pool, ngx_str_t *path,
    size_t map_size, ngx_msec_t sync)
{
    ngx_http_token_meter_store_t  *store;

    store = ngx_pcalloc(pool, sizeof(ngx_http_token_meter_store_t));
    if (store == NULL) {
        return NULL;
    }

    /* LMDB wants a NUL-terminated path */

    store->path.data = ngx_pnalloc(pool, path->len + 1);
    if (store->path.data == NULL) {
        return NULL;
    }

    ngx_memcpy(store->path.data, path->data, path->len);
    store->path.data[path->len] = '\0';
    store->path.len = path->len;

    store->map_size = map_size;
    store->sync = sync;

    return store;
}


/*
 * Runs in the master process while the configuration is loaded, and for
 * "nginx -t": creates the directory and the environment if they do not
 * exist, refuses a store that is not ours or is of an unknown schema, and
 * closes the environment again, since LMDB must not be used across fork().
 */

char *
ngx_http_token_meter_store_check(ngx_http_token_meter_store_t *store,
    ngx_conf_t *cf)
{
    char             *rv;
    u_char           *p;
    size_t            used;
    MDB_stat          st;
    MDB_envinfo       info;
    ngx_file_info_t   fi;
    u_char            name[NGX_MAX_PATH];

    if (store->map_size < NGX_HTTP_TOKEN_METER_MIN_MAP_SIZE) {
        return "size= must be at least 1m";
    }

    if (store->path.len + sizeof("/data.mdb") > NGX_MAX_PATH) {
        return "has too long a path";
    }

    if (ngx_file_info(store->path.data, &fi) == NGX_FILE_ERROR) {

        if (ngx_errno != NGX_ENOENT) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                               ngx_file_info_n " \"%V\" failed", &store->path);
            return NGX_CONF_ERROR;
        }

        if (ngx_create_dir(store->path.data, 0700) == NGX_FILE_ERROR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                               "cannot create token meter store \"%V\"",
                               &store->path);
            return NGX_CONF_ERROR;
        }

    } else if (!ngx_is_dir(&fi)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\" is not a directory",
                           &store->path);
        return NGX_CONF_ERROR;
    }

    if (access((char *) store->path.data, R_OK|W_OK|X_OK) != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "token meter store \"%V\" is not writable",
                           &store->path);
        return NGX_CONF_ERROR;
    }

    /*
     * LMDB takes an empty data file for a new store; here that means a
     * store lost its contents, which must not pass for a fresh start
     */

    p = ngx_cpymem(name, store->path.data, store->path.len);
    p = ngx_cpymem(p, "/data.mdb", sizeof("/data.mdb"));

    if (ngx_file_info(name, &fi) != NGX_FILE_ERROR && ngx_file_size(&fi) == 0)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\" has an empty data file; "
                           "restore it from a backup, or remove it to start "
                           "a new store", &store->path);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_token_meter_store_conf_env(store, cf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    mdb_env_info(store->env, &info);
    mdb_env_stat(store->env, &st);

    ngx_http_token_meter_store_close(store);

    used = (info.me_last_pgno + 1) * (size_t) st.ms_psize;

    if (used > store->map_size) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\" already holds %uz bytes, "
                           "more than size=%uz", &store->path, used,
                           store->map_size);
        return NGX_CONF_ERROR;
    }

    /*
     * LMDB has read only the meta pages so far; a data file cut short
     * would be read past its end through the map, which is a SIGBUS, not
     * an error it could return
     */

    if (ngx_file_info(name, &fi) != NGX_FILE_ERROR
        && (size_t) ngx_file_size(&fi) < used)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\" has a data file of %O "
                           "bytes, shorter than the %uz bytes its pages "
                           "need; restore it from a backup", &store->path,
                           ngx_file_size(&fi), used);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_token_meter_store_probe(store, cf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_token_meter_store_conf_env(store, cf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /* the probe's reader slot, had it died with one */

    (void) mdb_reader_check(store->env, NULL);

    rv = ngx_http_token_meter_store_init_schema(store, cf);

    ngx_http_token_meter_store_close(store);

    return rv;
}


static ngx_int_t
ngx_http_token_meter_store_conf_env(ngx_http_token_meter_store_t *store,
    ngx_conf_t *cf)
{
    char  *err;

    if (ngx_http_token_meter_store_env(store, cf->log, &err) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\" cannot be opened: %s",
                           &store->path, err);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * LMDB follows the page numbers it finds in the data file without
 * checking them, and a page past the end of the file is a SIGBUS.  So a
 * child process reads the store first, down to the first and the last
 * entry of each database: if that kills it, the master is told why
 * instead of dying the same way.
 */

static ngx_int_t
ngx_http_token_meter_store_probe(ngx_http_token_meter_store_t *store,
    ngx_conf_t *cf)
{
    int               status;
    pid_t             pid;
    sigset_t          set, old;
    ngx_int_t         rc;

    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);

    /* the master's SIGCHLD handler must not reap the probe */

    if (sigprocmask(SIG_BLOCK, &set, &old) == -1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "sigprocmask() failed");
        return NGX_ERROR;
    }

    pid = fork();

    if (pid == 0) {

        /* a sanitizer's handlers would turn the signal into an exit */

        signal(SIGBUS, SIG_DFL);
        signal(SIGSEGV, SIG_DFL);

        ngx_http_token_meter_store_walk(store);
        _exit(0);
    }

    rc = NGX_OK;

    if (pid == -1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "token meter store \"%V\" cannot be checked: "
                           "fork() failed", &store->path);
        rc = NGX_ERROR;
        goto done;
    }

    while (waitpid(pid, &status, 0) == -1) {
        if (ngx_errno != NGX_EINTR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                               "token meter store \"%V\" cannot be checked: "
                               "waitpid() failed", &store->path);
            rc = NGX_ERROR;
            goto done;
        }
    }

    if (WIFSIGNALED(status)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\" is corrupt: reading it "
                           "killed the checking process with signal %d; "
                           "restore it from a backup",
                           &store->path, WTERMSIG(status));
        rc = NGX_ERROR;

    } else if (WEXITSTATUS(status) != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\" cannot be checked: "
                           "the checking process exited with status %d",
                           &store->path, WEXITSTATUS(status));
        rc = NGX_ERROR;
    }

done:

    (void) sigprocmask(SIG_SETMASK, &old, NULL);

    return rc;
}


static void
ngx_http_token_meter_store_walk(ngx_http_token_meter_store_t *store)
{
    char        *err, name[64];
    MDB_txn     *txn;
    MDB_val      key, val;
    MDB_dbi      main, dbi;
    MDB_stat     st;
    ngx_uint_t   n;
    MDB_cursor  *cur, *dcur;

    /*
     * errors are the master's to find and report; only signals count
     *
     * TODO: damage deeper in a tree is not reached here; an option to
     * walk every page, for a store just restored, would find it
     */

    if (ngx_http_token_meter_store_env(store, store->log, &err) != NGX_OK) {
        return;
    }

    if (mdb_txn_begin(store->env, NULL, MDB_RDONLY, &txn) != 0) {
        return;
    }

    if (mdb_dbi_open(txn, NULL, 0, &main) != 0
        || mdb_cursor_open(txn, main, &cur) != 0)
    {
        return;
    }

    for (n = 0; mdb_cursor_get(cur, &key, &val, n ? MDB_NEXT : MDB_FIRST)
                == 0;
         n++)
    {
        if (key.mv_size >= sizeof(name)) {
            continue;
        }

        ngx_memcpy(name, key.mv_data, key.mv_size);
        name[key.mv_size] = '\0';

        if (mdb_dbi_open(txn, name, 0, &dbi) != 0
            || mdb_stat(txn, dbi, &st) != 0
            || mdb_cursor_open(txn, dbi, &dcur) != 0)
        {
            continue;
        }

        (void) mdb_cursor_get(dcur, &key, &val, MDB_FIRST);
        (void) mdb_cursor_get(dcur, &key, &val, MDB_LAST);

        mdb_cursor_close(dcur);
    }

    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    mdb_env_close(store->env);
    store->env = NULL;
}


static char *
ngx_http_token_meter_store_init_schema(ngx_http_token_meter_store_t *store,
    ngx_conf_t *cf)
{
    int          rc;
    u_char       buf[4];
    MDB_txn     *txn;
    MDB_val      key, val;
    MDB_dbi      main;
    uint32_t     version;
    ngx_uint_t   i, n;
    MDB_cursor  *cur;

    rc = mdb_txn_begin(store->env, NULL, 0, &txn);
    if (rc != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\": "
                           "mdb_txn_begin() failed: %s",
                           &store->path, mdb_strerror(rc));
        return NGX_CONF_ERROR;
    }

    /*
     * The unnamed database of an environment lists its named databases.
     * A store that has entries there which are not ours belongs to some
     * other program and is left alone.
     */

    rc = mdb_dbi_open(txn, NULL, 0, &main);
    if (rc != 0) {
        goto failed;
    }

    rc = mdb_cursor_open(txn, main, &cur);
    if (rc != 0) {
        goto failed;
    }

    n = 0;

    while (mdb_cursor_get(cur, &key, &val,
                          n++ ? MDB_NEXT : MDB_FIRST) == 0)
    {
        for (i = 0; ngx_http_token_meter_db_names[i]; i++) {
            if (key.mv_size == ngx_strlen(ngx_http_token_meter_db_names[i])
                && ngx_strncmp(key.mv_data, ngx_http_token_meter_db_names[i],
                               key.mv_size)
                   == 0)
            {
                break;
            }
        }

        if (ngx_http_token_meter_db_names[i] == NULL) {
            mdb_cursor_close(cur);
            mdb_txn_abort(txn);
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\" is an LMDB environment of another "
                               "program, not a token meter store",
                               &store->path);
            return NGX_CONF_ERROR;
        }
    }

    mdb_cursor_close(cur);

    for (i = 0; i < NGX_HTTP_TOKEN_METER_DB_N; i++) {
        rc = mdb_dbi_open(txn, ngx_http_token_meter_db_names[i], MDB_CREATE,
                          &store->dbi[i]);
        if (rc != 0) {
            goto failed;
        }
    }

    key.mv_data = "schema";
    key.mv_size = sizeof("schema") - 1;

    rc = mdb_get(txn, store->dbi[NGX_HTTP_TOKEN_METER_DB_META], &key, &val);

    if (rc == MDB_NOTFOUND) {
        version = NGX_HTTP_TOKEN_METER_SCHEMA_VERSION;

        buf[0] = (u_char) (version >> 24);
        buf[1] = (u_char) (version >> 16);
        buf[2] = (u_char) (version >> 8);
        buf[3] = (u_char) version;

        val.mv_data = buf;
        val.mv_size = 4;

        rc = mdb_put(txn, store->dbi[NGX_HTTP_TOKEN_METER_DB_META], &key,
                     &val, 0);
        if (rc != 0) {
            goto failed;
        }

        ngx_log_error(NGX_LOG_NOTICE, cf->log, 0,
                      "token meter store \"%V\" created with schema "
                      "version %uD", &store->path, version);

    } else if (rc != 0) {
        goto failed;

    } else {
        if (val.mv_size != 4) {
            mdb_txn_abort(txn);
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "token meter store \"%V\" has a damaged schema "
                               "record", &store->path);
            return NGX_CONF_ERROR;
        }

        version = ((uint32_t) ((u_char *) val.mv_data)[0] << 24)
                  | ((uint32_t) ((u_char *) val.mv_data)[1] << 16)
                  | ((uint32_t) ((u_char *) val.mv_data)[2] << 8)
                  | ((uint32_t) ((u_char *) val.mv_data)[3]);

        if (version != NGX_HTTP_TOKEN_METER_SCHEMA_VERSION) {
            mdb_txn_abort(txn);
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "token meter store \"%V\" has schema "
                               "version %uD, "
                               "this module understands only version %d",
                               &store->path, version,
                               NGX_HTTP_TOKEN_METER_SCHEMA_VERSION);
            return NGX_CONF_ERROR;
        }
    }

    rc = mdb_txn_commit(txn);
    if (rc != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "token meter store \"%V\": "
                           "mdb_txn_commit() failed: %s",
                           &store->path, mdb_strerror(rc));
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

failed:

    mdb_txn_abort(txn);

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "token meter store \"%V\" cannot be initialized: %s",
                       &store->path, mdb_strerror(rc));

    return NGX_CONF_ERROR;
}


static ngx_int_t
ngx_http_token_meter_store_env(ngx_http_token_meter_store_t *store,
    ngx_log_t *log, char **err)
{
    int           rc;
    unsigned int  flags;

    rc = mdb_env_create(&store->env);
    if (rc != 0) {
        *err = mdb_strerror(rc);
        store->env = NULL;
        return NGX_ERROR;
    }

    rc = mdb_env_set_maxdbs(store->env, NGX_HTTP_TOKEN_METER_DB_N);
    if (rc != 0) {
        goto failed;
    }

    rc = mdb_env_set_mapsize(store->env, store->map_size);
    if (rc != 0) {
        goto failed;
    }

    /*
     * MDB_NOTLS ties reader slots to transactions, not to threads, which
     * is what an event loop that runs many requests in one thread needs.
     * The map stays read-only (no MDB_WRITEMAP): a write that fails, on a
     * full disk for one, is then an error to handle, not a SIGBUS.
     */

    flags = MDB_NOTLS;

    if (store->sync != 0) {
        flags |= MDB_NOSYNC;
    }

    rc = mdb_env_open(store->env, (char *) store->path.data, flags, 0600);
    if (rc != 0) {
        goto failed;
    }

    store->log = log;

    return NGX_OK;

failed:

    *err = mdb_strerror(rc);
    mdb_env_close(store->env);
    store->env = NULL;

    return NGX_ERROR;
}


ngx_int_t
ngx_http_token_meter_store_chown(ngx_http_token_meter_store_t *store,
    ngx_uid_t user, ngx_gid_t group, ngx_log_t *log)
{
    u_char      *p, *last;
    ngx_uint_t   i;
    static char *files[] = { "", "/data.mdb", "/lock.mdb", NULL };
    u_char       name[NGX_MAX_PATH];

    if (geteuid() != 0 || user == (ngx_uid_t) NGX_CONF_UNSET_UINT) {
        return NGX_OK;
    }

    last = name + sizeof(name);

    for (i = 0; files[i]; i++) {
        p = ngx_slprintf(name, last - 1, "%V%s", &store->path, files[i]);
        *p = '\0';

        if (chown((char *) name, user, group) == -1) {
            ngx_log_error(NGX_LOG_EMERG, log, ngx_errno,
                          "chown(\"%s\", %d) failed", name, (int) user);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_store_open(ngx_http_token_meter_store_t *store,
    ngx_log_t *log)
{
    int          rc;
    char        *err;
    MDB_txn     *txn;
    ngx_uint_t   i;

    if (ngx_http_token_meter_store_env(store, log, &err) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, log, 0,
                      "token meter store \"%V\": mdb_env_open() failed: %s",
                      &store->path, err);
        return NGX_ERROR;
    }

    rc = mdb_txn_begin(store->env, NULL, MDB_RDONLY, &txn);
    if (rc != 0) {
        goto failed;
    }

    for (i = 0; i < NGX_HTTP_TOKEN_METER_DB_N; i++) {
        rc = mdb_dbi_open(txn, ngx_http_token_meter_db_names[i], 0,
                          &store->dbi[i]);
        if (rc != 0) {
            mdb_txn_abort(txn);
            goto failed;
        }
    }

    rc = mdb_txn_commit(txn);
    if (rc != 0) {
        goto failed;
    }

    if (store->sync != 0 && store->sync != NGX_HTTP_TOKEN_METER_SYNC_OFF) {
        ngx_http_token_meter_syncer_start(store, log);
    }

    return NGX_OK;

failed:

    ngx_log_error(NGX_LOG_ALERT, log, 0,
                  "token meter store \"%V\" cannot be opened: %s",
                  &store->path, mdb_strerror(rc));

    mdb_env_close(store->env);
    store->env = NULL;

    return NGX_ERROR;
}


void
ngx_http_token_meter_store_close(ngx_http_token_meter_store_t *store)
{
    if (store->env == NULL) {
        return;
    }

    ngx_http_token_meter_syncer_stop(store);

    if (store->reader) {
        mdb_txn_abort(store->reader);
        store->reader = NULL;
    }

    if (store->sync != 0) {
        (void) mdb_env_sync(store->env, 1);
    }

    mdb_env_close(store->env);
    store->env = NULL;
}


/*
 * With sync=<time> the map is flushed to disk by a thread of the worker:
 * an fdatasync() of a busy store takes milliseconds, which the event loop
 * would otherwise spend waiting.  Without the thread the flush is done in
 * the event loop.
 */

static void
ngx_http_token_meter_syncer_start(ngx_http_token_meter_store_t *store,
    ngx_log_t *log)
{
    int          err;
    sigset_t     set, old;
    const char  *call;

    if (store->syncer_running) {
        return;
    }

    call = "pthread_mutex_init()";

    err = pthread_mutex_init(&store->sync_mutex, NULL);
    if (err != 0) {
        goto failed;
    }

    call = "pthread_cond_init()";

    err = pthread_cond_init(&store->sync_cond, NULL);
    if (err != 0) {
        (void) pthread_mutex_destroy(&store->sync_mutex);
        goto failed;
    }

    store->sync_wanted = 0;
    store->sync_stop = 0;
    store->sync_error = 0;

    /* signals are the event loop's to handle */

    sigfillset(&set);
    (void) pthread_sigmask(SIG_SETMASK, &set, &old);

    call = "pthread_create()";

    err = pthread_create(&store->syncer, NULL, ngx_http_token_meter_syncer,
                         store);

    (void) pthread_sigmask(SIG_SETMASK, &old, NULL);

    if (err != 0) {
        (void) pthread_cond_destroy(&store->sync_cond);
        (void) pthread_mutex_destroy(&store->sync_mutex);
        goto failed;
    }

    store->syncer_running = 1;

    return;

failed:

    ngx_log_error(NGX_LOG_ALERT, log, err,
                  "token meter store \"%V\": %s failed, the store is "
                  "flushed in the event loop", &store->path, call);
}


static void
ngx_http_token_meter_syncer_stop(ngx_http_token_meter_store_t *store)
{
    if (!store->syncer_running) {
        return;
    }

    (void) pthread_mutex_lock(&store->sync_mutex);
    store->sync_stop = 1;
    (void) pthread_cond_signal(&store->sync_cond);
    (void) pthread_mutex_unlock(&store->sync_mutex);

    (void) pthread_join(store->syncer, NULL);

    (void) pthread_cond_destroy(&store->sync_cond);
    (void) pthread_mutex_destroy(&store->sync_mutex);

    store->syncer_running = 0;
}


static void *
ngx_http_token_meter_syncer(void *data)
{
    ngx_http_token_meter_store_t *store = data;

    int  rc;

    (void) pthread_mutex_lock(&store->sync_mutex);

    for ( ;; ) {

        while (!store->sync_wanted && !store->sync_stop) {
            (void) pthread_cond_wait(&store->sync_cond, &store->sync_mutex);
        }

        if (store->sync_stop) {
            break;
        }

        store->sync_wanted = 0;

        (void) pthread_mutex_unlock(&store->sync_mutex);

        rc = mdb_env_sync(store->env, 1);

        (void) pthread_mutex_lock(&store->sync_mutex);

        if (rc != 0) {
            store->sync_error = rc;
        }
    }

    (void) pthread_mutex_unlock(&store->sync_mutex);

    return NULL;
}


ngx_uint_t
ngx_http_token_meter_store_is_open(ngx_http_token_meter_store_t *store)
{
    return store->env != NULL;
}


ngx_int_t
ngx_http_token_meter_store_sync(ngx_http_token_meter_store_t *store)
{
    int  rc;

    if (store->env == NULL) {
        return NGX_OK;
    }

    if (store->syncer_running) {
        (void) pthread_mutex_lock(&store->sync_mutex);

        rc = store->sync_error;
        store->sync_error = 0;
        store->sync_wanted = 1;
        (void) pthread_cond_signal(&store->sync_cond);

        (void) pthread_mutex_unlock(&store->sync_mutex);

    } else {
        rc = mdb_env_sync(store->env, 1);
    }

    if (rc != 0) {
        ngx_log_error(NGX_LOG_CRIT, store->log, 0,
                      "token meter store \"%V\": mdb_env_sync() failed: %s",
                      &store->path, mdb_strerror(rc));
        return NGX_ERROR;
    }

    return NGX_OK;
}


void
ngx_http_token_meter_store_reader_check(ngx_http_token_meter_store_t *store)
{
    int  rc, dead;

    if (store->env == NULL) {
        return;
    }

    rc = mdb_reader_check(store->env, &dead);
    if (rc != 0) {
        ngx_log_error(NGX_LOG_ALERT, store->log, 0,
                      "token meter store \"%V\": mdb_reader_check() "
                      "failed: %s", &store->path, mdb_strerror(rc));
        return;
    }

    if (dead) {
        ngx_log_error(NGX_LOG_NOTICE, store->log, 0,
                      "token meter store \"%V\": cleared %d stale readers",
                      &store->path, dead);
    }
}


ngx_int_t
ngx_http_token_meter_store_stat(ngx_http_token_meter_store_t *store,
    ngx_http_token_meter_store_stat_t *stat)
{
    MDB_stat     st;
    MDB_envinfo  info;

    if (store->env == NULL) {
        return NGX_ERROR;
    }

    mdb_env_info(store->env, &info);
    mdb_env_stat(store->env, &st);

    stat->map_size = info.me_mapsize;
    stat->page_size = st.ms_psize;
    stat->used = (info.me_last_pgno + 1) * (size_t) st.ms_psize;
    stat->readers = info.me_numreaders;
    stat->max_readers = info.me_maxreaders;

    return NGX_OK;
}


/*
 * NGX_OK while the store's high-water mark leaves an eighth of the map
 * (128k at least) for the settlements of requests already admitted.
 */

ngx_int_t
ngx_http_token_meter_store_room(ngx_http_token_meter_store_t *store,
    ngx_log_t *log)
{
    size_t       used, room;
    MDB_stat     st;
    MDB_envinfo  info;

    if (store->env == NULL) {
        return NGX_ERROR;
    }

    mdb_env_info(store->env, &info);
    mdb_env_stat(store->env, &st);

    used = (info.me_last_pgno + 1) * (size_t) st.ms_psize;
    room = ngx_max(info.me_mapsize / 8, 128 * 1024);

    if (used + room <= info.me_mapsize) {
        return NGX_OK;
    }

    if (ngx_time() - store->full_logged >= 60) {
        store->full_logged = ngx_time();

        ngx_log_error(NGX_LOG_CRIT, log, 0,
                      "token meter store \"%V\" is nearly full, %uz of %uz "
                      "bytes used: new requests are refused; raise size= "
                      "in token_meter_store and reload nginx", &store->path,
                      used, info.me_mapsize);
    }

    return NGX_DECLINED;
}


ngx_int_t
ngx_http_token_meter_store_entries(ngx_http_token_meter_store_t *store,
    ngx_uint_t db, uint64_t *entries)
{
    int       rc;
    MDB_txn  *txn;
    MDB_stat  st;

    if (store->env == NULL) {
        return NGX_ERROR;
    }

    rc = mdb_txn_begin(store->env, NULL, MDB_RDONLY, &txn);
    if (rc != 0) {
        return NGX_ERROR;
    }

    rc = mdb_stat(txn, store->dbi[db], &st);

    mdb_txn_abort(txn);

    if (rc != 0) {
        return NGX_ERROR;
    }

    *entries = st.ms_entries;

    return NGX_OK;
}


ngx_str_t *
ngx_http_token_meter_store_path(ngx_http_token_meter_store_t *store)
{
    return &store->path;
}


ngx_msec_t
ngx_http_token_meter_store_sync_interval(ngx_http_token_meter_store_t *store)
{
    return store->sync;
}


ngx_int_t
ngx_http_token_meter_txn_begin(ngx_http_token_meter_store_t *store,
    ngx_http_token_meter_txn_t **txnp, ngx_uint_t write, ngx_log_t *log)
{
    int                          rc, dead;
    ngx_uint_t                   tries;
    ngx_http_token_meter_txn_t  *txn;

    if (store->env == NULL) {
        ngx_log_error(NGX_LOG_CRIT, log, 0,
                      "token meter store \"%V\" is not open", &store->path);
        return NGX_ERROR;
    }

    txn = ngx_alloc(sizeof(ngx_http_token_meter_txn_t), log);
    if (txn == NULL) {
        return NGX_ERROR;
    }

    txn->store = store;
    txn->log = log;
    txn->write = write;

    if (!write && store->reader) {

        /* renewing keeps the reader slot: no lock on the reader table */

        txn->txn = store->reader;
        store->reader = NULL;

        if (mdb_txn_renew(txn->txn) == 0) {
            *txnp = txn;
            return NGX_OK;
        }

        mdb_txn_abort(txn->txn);
    }

    for (tries = 0; /* void */; tries++) {

        rc = mdb_txn_begin(store->env, NULL, write ? 0 : MDB_RDONLY,
                           &txn->txn);
        if (rc == 0) {
            break;
        }

        if (tries == 0 && rc == MDB_MAP_RESIZED) {

            /*
             * another process, started with a larger size=, has grown
             * the map: adopt its size and try again
             */

            ngx_log_error(NGX_LOG_NOTICE, log, 0,
                          "token meter store \"%V\" was resized by "
                          "another process", &store->path);

            rc = mdb_env_set_mapsize(store->env, 0);
            if (rc == 0) {
                continue;
            }
        }

        if (tries == 0 && rc == MDB_READERS_FULL) {
            (void) mdb_reader_check(store->env, &dead);

            if (dead) {
                continue;
            }

            ngx_log_error(NGX_LOG_ALERT, log, 0,
                          "token meter store \"%V\": the reader table is "
                          "full; too many processes use the store",
                          &store->path);
        }

        ngx_log_error(NGX_LOG_CRIT, log, 0,
                      "token meter store \"%V\": mdb_txn_begin() failed: %s",
                      &store->path, mdb_strerror(rc));
        ngx_free(txn);

        return NGX_ERROR;
    }

    *txnp = txn;

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_txn_commit(ngx_http_token_meter_txn_t *txn)
{
    int        rc;
    ngx_int_t  status;

    rc = mdb_txn_commit(txn->txn);

    status = NGX_OK;

    if (rc != 0) {
        status = ngx_http_token_meter_store_failed(txn, "mdb_txn_commit()",
                                                    rc);
    }

    ngx_free(txn);

    return status;
}


void
ngx_http_token_meter_txn_abort(ngx_http_token_meter_txn_t *txn)
{
    if (!txn->write && txn->store->reader == NULL) {
        mdb_txn_reset(txn->txn);
        txn->store->reader = txn->txn;

    } else {
        mdb_txn_abort(txn->txn);
    }

    ngx_free(txn);
}


ngx_int_t
ngx_http_token_meter_get(ngx_http_token_meter_txn_t *txn, ngx_uint_t db,
    void *key, size_t key_len, ngx_str_t *value)
{
    int      rc;
    MDB_val  k, v;

    k.mv_data = key;
    k.mv_size = key_len;

    rc = mdb_get(txn->txn, txn->store->dbi[db], &k, &v);

    if (rc == MDB_NOTFOUND) {
        return NGX_DECLINED;
    }

    if (rc != 0) {
        return ngx_http_token_meter_store_failed(txn, "mdb_get()", rc);
    }

    value->data = v.mv_data;
    value->len = v.mv_size;

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_put(ngx_http_token_meter_txn_t *txn, ngx_uint_t db,
    void *key, size_t key_len, void *value, size_t len,
    ngx_uint_t no_overwrite)
{
    int      rc;
    MDB_val  k, v;

    k.mv_data = key;
    k.mv_size = key_len;
    v.mv_data = value;
    v.mv_size = len;

    rc = mdb_put(txn->txn, txn->store->dbi[db], &k, &v,
                 no_overwrite ? MDB_NOOVERWRITE : 0);

    if (rc == MDB_KEYEXIST) {
        return NGX_BUSY;
    }

    if (rc != 0) {
        return ngx_http_token_meter_store_failed(txn, "mdb_put()", rc);
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_del(ngx_http_token_meter_txn_t *txn, ngx_uint_t db,
    void *key, size_t key_len)
{
    int      rc;
    MDB_val  k;

    k.mv_data = key;
    k.mv_size = key_len;

    rc = mdb_del(txn->txn, txn->store->dbi[db], &k, NULL);

    if (rc == MDB_NOTFOUND) {
        return NGX_DECLINED;
    }

    if (rc != 0) {
        return ngx_http_token_meter_store_failed(txn, "mdb_del()", rc);
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_next_id(ngx_http_token_meter_txn_t *txn, char *name,
    uint64_t *id)
{
    u_char     buf[8];
    uint64_t   n;
    ngx_int_t  rc;
    ngx_str_t  v;

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_META, name,
                                  ngx_strlen(name), &v);

    if (rc == NGX_OK && v.len == 8) {
        n = ngx_http_token_meter_get_u64(v.data);

    } else if (rc == NGX_DECLINED) {
        n = 0;

    } else {
        return NGX_ERROR;
    }

    n++;

    ngx_http_token_meter_put_u64(buf, n);

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_META, name,
                                  ngx_strlen(name), buf, 8, 0);
    if (rc != NGX_OK) {
        return rc;
    }

    *id = n;

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_cursor_open(ngx_http_token_meter_txn_t *txn,
    ngx_uint_t db, ngx_http_token_meter_cursor_t **curp)
{
    int                             rc;
    ngx_http_token_meter_cursor_t  *cur;

    cur = ngx_alloc(sizeof(ngx_http_token_meter_cursor_t), txn->log);
    if (cur == NULL) {
        return NGX_ERROR;
    }

    rc = mdb_cursor_open(txn->txn, txn->store->dbi[db], &cur->cursor);
    if (rc != 0) {
        ngx_free(cur);
        return ngx_http_token_meter_store_failed(txn, "mdb_cursor_open()",
                                                 rc);
    }

    cur->txn = txn;
    *curp = cur;

    return NGX_OK;
}


static ngx_int_t
ngx_http_token_meter_cursor_get(ngx_http_token_meter_cursor_t *cur,
    MDB_val *key, ngx_str_t *k, ngx_str_t *v, MDB_cursor_op op)
{
    int      rc;
    MDB_val  mk, mv;

    if (key) {
        mk = *key;
    }

    rc = mdb_cursor_get(cur->cursor, &mk, &mv, op);

    if (rc == MDB_NOTFOUND) {
        return NGX_DONE;
    }

    if (rc != 0) {
        return ngx_http_token_meter_store_failed(cur->txn, "mdb_cursor_get()",
                                                 rc);
    }

    k->data = mk.mv_data;
    k->len = mk.mv_size;
    v->data = mv.mv_data;
    v->len = mv.mv_size;

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_cursor_seek(ngx_http_token_meter_cursor_t *cur,
    void *key, size_t key_len, ngx_str_t *k, ngx_str_t *v)
{
    MDB_val  mk;

    if (key_len == 0) {
        return ngx_http_token_meter_cursor_get(cur, NULL, k, v, MDB_FIRST);
    }

    mk.mv_data = key;
    mk.mv_size = key_len;

    return ngx_http_token_meter_cursor_get(cur, &mk, k, v, MDB_SET_RANGE);
}


ngx_int_t
ngx_http_token_meter_cursor_next(ngx_http_token_meter_cursor_t *cur,
    ngx_str_t *k, ngx_str_t *v)
{
    return ngx_http_token_meter_cursor_get(cur, NULL, k, v, MDB_NEXT);
}


ngx_int_t
ngx_http_token_meter_cursor_last(ngx_http_token_meter_cursor_t *cur,
    ngx_str_t *k, ngx_str_t *v)
{
    return ngx_http_token_meter_cursor_get(cur, NULL, k, v, MDB_LAST);
}


ngx_int_t
ngx_http_token_meter_cursor_prev(ngx_http_token_meter_cursor_t *cur,
    ngx_str_t *k, ngx_str_t *v)
{
    return ngx_http_token_meter_cursor_get(cur, NULL, k, v, MDB_PREV);
}


ngx_int_t
ngx_http_token_meter_cursor_del(ngx_http_token_meter_cursor_t *cur)
{
    int  rc;

    rc = mdb_cursor_del(cur->cursor, 0);
    if (rc != 0) {
        return ngx_http_token_meter_store_failed(cur->txn, "mdb_cursor_del()",
                                                 rc);
    }

    return NGX_OK;
}


void
ngx_http_token_meter_cursor_close(ngx_http_token_meter_cursor_t *cur)
{
    mdb_cursor_close(cur->cursor);
    ngx_free(cur);
}


static ngx_int_t
ngx_http_token_meter_store_failed(ngx_http_token_meter_txn_t *txn,
    const char *call, int rc)
{
    ngx_http_token_meter_store_t  *store;

    store = txn->store;

    if (rc == MDB_MAP_FULL) {
        ngx_log_error(NGX_LOG_CRIT, txn->log, 0,
                      "token meter store \"%V\" is full at size=%uz: "
                      "raise size= in token_meter_store and reload nginx",
                      &store->path, store->map_size);
        return NGX_HTTP_TOKEN_METER_FULL;
    }

    ngx_log_error(NGX_LOG_CRIT, txn->log, 0,
                  "token meter store \"%V\": %s failed: %s",
                  &store->path, call, mdb_strerror(rc));

    return NGX_ERROR;
}


void
ngx_http_token_meter_put_u64(u_char *p, uint64_t n)
{
    ngx_uint_t  i;

    for (i = 0; i < 8; i++) {
        p[7 - i] = (u_char) (n & 0xff);
        n >>= 8;
    }
}


uint64_t
ngx_http_token_meter_get_u64(u_char *p)
{
    uint64_t    n;
    ngx_uint_t  i;

    n = 0;

    for (i = 0; i < 8; i++) {
        n = (n << 8) | p[i];
    }

    return n;
}
