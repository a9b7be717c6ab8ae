
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#ifndef _NGX_HTTP_TOKEN_METER_STORE_H_INCLUDED_
#define _NGX_HTTP_TOKEN_METER_STORE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


#define NGX_HTTP_TOKEN_METER_SCHEMA_VERSION  1


/*
 * Status codes of the store wrapper, beyond NGX_OK and NGX_ERROR.
 * NGX_DECLINED means "not found", NGX_BUSY means "the key exists".
 * NGX_HTTP_TOKEN_METER_FULL is returned for MDB_MAP_FULL so that callers
 * can say why the store refused.
 */
#define NGX_HTTP_TOKEN_METER_FULL  -10

/* sync=off: never flushed by the module, left to the kernel */
#define NGX_HTTP_TOKEN_METER_SYNC_OFF  ((ngx_msec_t) -1)


typedef enum {
    NGX_HTTP_TOKEN_METER_DB_META = 0,
    NGX_HTTP_TOKEN_METER_DB_SUBSCRIBERS,
    NGX_HTTP_TOKEN_METER_DB_KEYS,
    NGX_HTTP_TOKEN_METER_DB_KEY_IDS,
    NGX_HTTP_TOKEN_METER_DB_MSISDNS,
    NGX_HTTP_TOKEN_METER_DB_TRIALS,
    NGX_HTTP_TOKEN_METER_DB_GRANTS,
    NGX_HTTP_TOKEN_METER_DB_RESERVATIONS,
    NGX_HTTP_TOKEN_METER_DB_PURCHASES,
    NGX_HTTP_TOKEN_METER_DB_USAGE,
    NGX_HTTP_TOKEN_METER_DB_USAGE_TIME,
    NGX_HTTP_TOKEN_METER_DB_USAGE_SUBSCRIBER,
    NGX_HTTP_TOKEN_METER_DB_COUNTERS,
    NGX_HTTP_TOKEN_METER_DB_N
} ngx_http_token_meter_db_e;


typedef struct ngx_http_token_meter_store_s   ngx_http_token_meter_store_t;
typedef struct ngx_http_token_meter_txn_s     ngx_http_token_meter_txn_t;
typedef struct ngx_http_token_meter_cursor_s  ngx_http_token_meter_cursor_t;


typedef struct {
    size_t                      map_size;
    size_t                      used;
    size_t                      page_size;
    ngx_uint_t                  readers;
    ngx_uint_t                  max_readers;
} ngx_http_token_meter_store_stat_t;


ngx_http_token_meter_store_t *ngx_http_token_meter_store_create(
    ngx_pool_t *pool, ngx_str_t *path, size_t map_size, ngx_msec_t sync);
char *ngx_http_token_meter_store_check(ngx_http_token_meter_store_t *store,
    ngx_conf_t *cf);
ngx_int_t ngx_http_token_meter_store_chown(
    ngx_http_token_meter_store_t *store, ngx_uid_t user, ngx_gid_t group,
    ngx_log_t *log);
ngx_int_t ngx_http_token_meter_store_open(
    ngx_http_token_meter_store_t *store, ngx_log_t *log);
void ngx_http_token_meter_store_close(ngx_http_token_meter_store_t *store);
ngx_uint_t ngx_http_token_meter_store_is_open(
    ngx_http_token_meter_store_t *store);
ngx_int_t ngx_http_token_meter_store_sync(
    ngx_http_token_meter_store_t *store);
void ngx_http_token_meter_store_reader_check(
    ngx_http_token_meter_store_t *store);
ngx_int_t ngx_http_token_meter_store_stat(
    ngx_http_token_meter_store_t *store,
    ngx_http_token_meter_store_stat_t *stat);
ngx_int_t ngx_http_token_meter_store_room(ngx_http_token_meter_store_t *store,
    ngx_log_t *log);
ngx_int_t ngx_http_token_meter_store_entries(
    ngx_http_token_meter_store_t *store, ngx_uint_t db, uint64_t *entries);
ngx_str_t *ngx_http_token_meter_store_path(
    ngx_http_token_meter_store_t *store);
ngx_msec_t ngx_http_token_meter_store_sync_interval(
    ngx_http_token_meter_store_t *store);

ngx_int_t ngx_http_token_meter_txn_begin(ngx_http_token_meter_store_t *store,
    ngx_http_token_meter_txn_t **txnp, ngx_uint_t write, ngx_log_t *log);
ngx_int_t ngx_http_token_meter_txn_commit(ngx_http_token_meter_txn_t *txn);
void ngx_http_token_meter_txn_abort(ngx_http_token_meter_txn_t *txn);

ngx_int_t ngx_http_token_meter_get(ngx_http_token_meter_txn_t *txn,
    ngx_uint_t db, void *key, size_t key_len, ngx_str_t *value);
ngx_int_t ngx_http_token_meter_put(ngx_http_token_meter_txn_t *txn,
    ngx_uint_t db, void *key, size_t key_len, void *value, size_t len,
    ngx_uint_t no_overwrite);
ngx_int_t ngx_http_token_meter_del(ngx_http_token_meter_txn_t *txn,
    ngx_uint_t db, void *key, size_t key_len);
ngx_int_t ngx_http_token_meter_next_id(ngx_http_token_meter_txn_t *txn,
    char *name, uint64_t *id);

ngx_int_t ngx_http_token_meter_cursor_open(ngx_http_token_meter_txn_t *txn,
    ngx_uint_t db, ngx_http_token_meter_cursor_t **curp);
ngx_int_t ngx_http_token_meter_cursor_seek(
    ngx_http_token_meter_cursor_t *cur, void *key, size_t key_len,
    ngx_str_t *k, ngx_str_t *v);
ngx_int_t ngx_http_token_meter_cursor_next(
    ngx_http_token_meter_cursor_t *cur, ngx_str_t *k, ngx_str_t *v);
ngx_int_t ngx_http_token_meter_cursor_last(
    ngx_http_token_meter_cursor_t *cur, ngx_str_t *k, ngx_str_t *v);
ngx_int_t ngx_http_token_meter_cursor_prev(
    ngx_http_token_meter_cursor_t *cur, ngx_str_t *k, ngx_str_t *v);
ngx_int_t ngx_http_token_meter_cursor_del(
    ngx_http_token_meter_cursor_t *cur);
void ngx_http_token_meter_cursor_close(ngx_http_token_meter_cursor_t *cur);


void ngx_http_token_meter_put_u64(u_char *p, uint64_t n);
uint64_t ngx_http_token_meter_get_u64(u_char *p);


#endif /* _NGX_HTTP_TOKEN_METER_STORE_H_INCLUDED_ */
