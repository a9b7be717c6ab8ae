
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include "ngx_http_token_meter_module.h"
#include "ngx_http_token_meter_account.h"


/*
 * Keys of the databases:
 *
 *   subscribers   id (8)                         subscriber_t
 *   msisdns       MSISDN                         id (8), open accounts only
 *   trials        MSISDN                         time of the trial (8)
 *   grants        id (8), expiry (8), grant (8)  grant_t
 *   keys          SHA-256 of the key (32)        id (8), key id
 *   key_ids       id (8), key id                 SHA-256, key_info_t
 *   purchases     payment reference              purchase_t, result
 *
 * Numbers in keys are big-endian so that cursors walk them in order:
 * the grants of a subscriber come earliest expiry first, which is the
 * order they are spent in.
 */


/* the value of a key: the subscriber id and the key id, 28 bytes */
#define NGX_HTTP_TOKEN_METER_KEY_REC  (8 + NGX_HTTP_TOKEN_METER_KEY_ID_LEN)


static ngx_int_t ngx_http_token_meter_grants_walk(
    ngx_http_token_meter_txn_t *txn, uint64_t subscriber, time_t now,
    ngx_http_token_meter_balance_t *balance, int64_t *debit);


ngx_int_t
ngx_http_token_meter_msisdn_valid(ngx_str_t *msisdn)
{
    size_t  i;

    /* E.164: a plus sign, a non-zero country code digit, 7-15 digits */

    if (msisdn->len < 8 || msisdn->len > 16 || msisdn->data[0] != '+'
        || msisdn->data[1] == '0')
    {
        return NGX_ERROR;
    }

    for (i = 1; i < msisdn->len; i++) {
        if (msisdn->data[i] < '0' || msisdn->data[i] > '9') {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


ngx_str_t
ngx_http_token_meter_msisdn(ngx_http_token_meter_subscriber_t *sub)
{
    ngx_str_t  s;

    s.data = sub->msisdn;
    s.len = ngx_strnlen(sub->msisdn, NGX_HTTP_TOKEN_METER_MSISDN_LEN);

    return s;
}


ngx_int_t
ngx_http_token_meter_subscriber_get(ngx_http_token_meter_txn_t *txn,
    uint64_t id, ngx_http_token_meter_subscriber_t *sub)
{
    u_char     key[8];
    ngx_int_t  rc;
    ngx_str_t  v;

    ngx_http_token_meter_put_u64(key, id);

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_SUBSCRIBERS,
                                  key, 8, &v);
    if (rc != NGX_OK) {
        return rc;
    }

    if (v.len != sizeof(ngx_http_token_meter_subscriber_t)) {
        return NGX_ERROR;
    }

    ngx_memcpy(sub, v.data, sizeof(ngx_http_token_meter_subscriber_t));

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_subscriber_put(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_subscriber_t *sub)
{
    u_char  key[8];

    ngx_http_token_meter_put_u64(key, sub->id);

    return ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_SUBSCRIBERS,
                                    key, 8, sub,
                                    sizeof(ngx_http_token_meter_subscriber_t),
                                    0);
}


ngx_int_t
ngx_http_token_meter_subscriber_find(ngx_http_token_meter_txn_t *txn,
    ngx_str_t *msisdn, uint64_t *id)
{
    ngx_int_t  rc;
    ngx_str_t  v;

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_MSISDNS,
                                  msisdn->data, msisdn->len, &v);
    if (rc != NGX_OK) {
        return rc;
    }

    if (v.len != 8) {
        return NGX_ERROR;
    }

    *id = ngx_http_token_meter_get_u64(v.data);

    return NGX_OK;
}


/*
 * Creates an active subscriber and its MSISDN index entry, and gives the
 * trial grant unless this MSISDN has ever had one.  NGX_BUSY: the MSISDN
 * belongs to an open account.
 */

ngx_int_t
ngx_http_token_meter_subscriber_create(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_main_conf_t *tmcf, ngx_str_t *msisdn, time_t now,
    ngx_http_token_meter_subscriber_t *sub)
{
    u_char                        key[24], value[8];
    uint64_t                      id;
    ngx_int_t                     rc;
    ngx_http_token_meter_grant_t  grant;

    rc = ngx_http_token_meter_next_id(txn, "next_subscriber", &id);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_token_meter_put_u64(value, id);

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_MSISDNS,
                                  msisdn->data, msisdn->len, value, 8, 1);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_memzero(sub, sizeof(ngx_http_token_meter_subscriber_t));

    sub->id = id;
    sub->created = now;
    sub->activated = now;
    sub->status = NGX_HTTP_TOKEN_METER_ACTIVE;
    ngx_memcpy(sub->msisdn, msisdn->data, msisdn->len);

    rc = ngx_http_token_meter_subscriber_put(txn, sub);
    if (rc != NGX_OK) {
        return rc;
    }

    if (tmcf->trial_points == 0) {
        return NGX_OK;
    }

    ngx_http_token_meter_put_u64(value, (uint64_t) now);

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_TRIALS,
                                  msisdn->data, msisdn->len, value, 8, 1);

    if (rc == NGX_BUSY) {
        /* this MSISDN had its trial on an earlier account */
        return NGX_OK;
    }

    if (rc != NGX_OK) {
        return rc;
    }

    ngx_memzero(&grant, sizeof(ngx_http_token_meter_grant_t));

    rc = ngx_http_token_meter_next_id(txn, "next_grant", &grant.id);
    if (rc != NGX_OK) {
        return rc;
    }

    grant.kind = NGX_HTTP_TOKEN_METER_GRANT_TRIAL;
    grant.points = tmcf->trial_points;
    grant.left = tmcf->trial_points;
    grant.granted = now;
    grant.expires = now + tmcf->trial_validity;

    ngx_http_token_meter_put_u64(key, id);
    ngx_http_token_meter_put_u64(key + 8, (uint64_t) grant.expires);
    ngx_http_token_meter_put_u64(key + 16, grant.id);

    return ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_GRANTS,
                                    key, 24, &grant, sizeof(grant), 1);
}


/*
 * Closing keeps the subscriber record, its grants, purchases and usage,
 * and frees the MSISDN for a new account; the trial index is kept, so a
 * new account on the same MSISDN gets no second trial.
 */

ngx_int_t
ngx_http_token_meter_subscriber_close(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_subscriber_t *sub, time_t now)
{
    int64_t                           revoked;
    ngx_int_t                         rc;
    ngx_str_t                         msisdn, key_id;
    ngx_uint_t                        i;
    ngx_pool_t                       *pool;
    ngx_array_t                       keys;
    ngx_http_token_meter_key_info_t  *info;

    pool = ngx_create_pool(1024, ngx_cycle->log);
    if (pool == NULL) {
        return NGX_ERROR;
    }

    if (ngx_array_init(&keys, pool, 4,
                       sizeof(ngx_http_token_meter_key_info_t))
        != NGX_OK)
    {
        ngx_destroy_pool(pool);
        return NGX_ERROR;
    }

    rc = ngx_http_token_meter_key_list(txn, sub->id, &keys);
    if (rc != NGX_OK) {
        goto done;
    }

    info = keys.elts;

    for (i = 0; i < keys.nelts; i++) {
        if (info[i].revoked) {
            continue;
        }

        key_id.data = info[i].key_id;
        key_id.len = NGX_HTTP_TOKEN_METER_KEY_ID_LEN;

        rc = ngx_http_token_meter_key_revoke(txn, sub->id, &key_id, now,
                                             &revoked);
        if (rc != NGX_OK) {
            goto done;
        }
    }

    msisdn = ngx_http_token_meter_msisdn(sub);

    rc = ngx_http_token_meter_del(txn, NGX_HTTP_TOKEN_METER_DB_MSISDNS,
                                  msisdn.data, msisdn.len);
    if (rc != NGX_OK && rc != NGX_DECLINED) {
        goto done;
    }

    sub->status = NGX_HTTP_TOKEN_METER_CLOSED;
    sub->closed = now;

    rc = ngx_http_token_meter_subscriber_put(txn, sub);

done:

    ngx_destroy_pool(pool);

    return rc;
}


/*
 * Adds an API key.  An empty key asks for a new random one, written back
 * into key (which must then have room for NGX_HTTP_TOKEN_METER_KEY_LEN
 * bytes); a given key is imported as it is.  NGX_BUSY: the key exists.
 */

ngx_int_t
ngx_http_token_meter_key_create(ngx_http_token_meter_txn_t *txn,
    uint64_t subscriber, ngx_str_t *key, time_t now, u_char *key_id)
{
    u_char                           *p;
    u_char                            hash[32], random[32];
    u_char                            value[NGX_HTTP_TOKEN_METER_KEY_REC];
    u_char                            id_key[NGX_HTTP_TOKEN_METER_KEY_REC];
    u_char                            id_value[32
                                        + sizeof(
                                          ngx_http_token_meter_key_info_t)];
    ngx_int_t                         rc;
    ngx_str_t                         src, dst;
    ngx_http_token_meter_key_info_t   info;

    if (key->len == 0) {
        if (ngx_http_token_meter_random(random, sizeof(random)) != NGX_OK) {
            return NGX_ERROR;
        }

        p = ngx_cpymem(key->data, "sk-tm-", 6);

        src.data = random;
        src.len = sizeof(random);
        dst.data = p;

        ngx_encode_base64url(&dst, &src);

        key->len = 6 + dst.len;
    }

    ngx_http_token_meter_sha256(key->data, key->len, hash);

    /* the public key id names the key without revealing it */

    p = ngx_cpymem(key_id, "key_", 4);
    ngx_hex_dump(p, hash, (NGX_HTTP_TOKEN_METER_KEY_ID_LEN - 4) / 2);

    ngx_http_token_meter_put_u64(value, subscriber);
    ngx_memcpy(value + 8, key_id, NGX_HTTP_TOKEN_METER_KEY_ID_LEN);

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_KEYS,
                                  hash, 32, value, sizeof(value), 1);
    if (rc != NGX_OK) {
        return rc;
    }

    /* the record goes to disk as it is: no stack bytes in its padding */

    ngx_memzero(&info, sizeof(ngx_http_token_meter_key_info_t));

    ngx_memcpy(info.key_id, key_id, NGX_HTTP_TOKEN_METER_KEY_ID_LEN);
    info.created = now;

    ngx_memcpy(id_key + 8, key_id, NGX_HTTP_TOKEN_METER_KEY_ID_LEN);
    ngx_http_token_meter_put_u64(id_key, subscriber);

    ngx_memcpy(id_value, hash, 32);
    ngx_memcpy(id_value + 32, &info, sizeof(info));

    return ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_KEY_IDS,
                                    id_key, sizeof(id_key), id_value,
                                    sizeof(id_value), 0);
}


ngx_int_t
ngx_http_token_meter_key_revoke(ngx_http_token_meter_txn_t *txn,
    uint64_t subscriber, ngx_str_t *key_id, time_t now, int64_t *revoked)
{
    u_char                            id_key[8
                                             + NGX_HTTP_TOKEN_METER_KEY_ID_LEN];
    u_char                            id_value[32
                                        + sizeof(
                                          ngx_http_token_meter_key_info_t)];
    u_char                            value[8 + NGX_HTTP_TOKEN_METER_KEY_ID_LEN
                                            + 1];
    ngx_int_t                         rc;
    ngx_str_t                         v;
    ngx_http_token_meter_key_info_t   info;

    if (key_id->len != NGX_HTTP_TOKEN_METER_KEY_ID_LEN) {
        return NGX_DECLINED;
    }

    ngx_http_token_meter_put_u64(id_key, subscriber);
    ngx_memcpy(id_key + 8, key_id->data, NGX_HTTP_TOKEN_METER_KEY_ID_LEN);

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_KEY_IDS,
                                  id_key, sizeof(id_key), &v);
    if (rc != NGX_OK) {
        return rc;
    }

    if (v.len != sizeof(id_value)) {
        return NGX_ERROR;
    }

    ngx_memcpy(id_value, v.data, sizeof(id_value));
    ngx_memcpy(&info, id_value + 32, sizeof(info));

    if (info.revoked) {
        *revoked = info.revoked;
        return NGX_OK;
    }

    /*
     * the hash stays, marked revoked, so that a key once revoked (say,
     * because it leaked) can never be imported again
     */

    ngx_http_token_meter_put_u64(value, subscriber);
    ngx_memcpy(value + 8, key_id->data, NGX_HTTP_TOKEN_METER_KEY_ID_LEN);
    value[8 + NGX_HTTP_TOKEN_METER_KEY_ID_LEN] = 1;

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_KEYS,
                                  id_value, 32, value, sizeof(value), 0);
    if (rc != NGX_OK) {
        return rc;
    }

    info.revoked = now;
    ngx_memcpy(id_value + 32, &info, sizeof(info));

    *revoked = now;

    return ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_KEY_IDS,
                                    id_key, sizeof(id_key), id_value,
                                    sizeof(id_value), 0);
}


ngx_int_t
ngx_http_token_meter_key_find(ngx_http_token_meter_txn_t *txn,
    ngx_str_t *key, uint64_t *subscriber)
{
    u_char     hash[32];
    ngx_int_t  rc;
    ngx_str_t  v;

    ngx_http_token_meter_sha256(key->data, key->len, hash);

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_KEYS, hash, 32,
                                  &v);
    if (rc != NGX_OK) {
        return rc;
    }

    if (v.len == 8 + NGX_HTTP_TOKEN_METER_KEY_ID_LEN + 1) {
        /* revoked */
        return NGX_DECLINED;
    }

    if (v.len != 8 + NGX_HTTP_TOKEN_METER_KEY_ID_LEN) {
        return NGX_ERROR;
    }

    *subscriber = ngx_http_token_meter_get_u64(v.data);

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_key_list(ngx_http_token_meter_txn_t *txn,
    uint64_t subscriber, ngx_array_t *keys)
{
    u_char                            prefix[8];
    ngx_int_t                         rc;
    ngx_str_t                         k, v;
    ngx_http_token_meter_cursor_t    *cur;
    ngx_http_token_meter_key_info_t  *info;

    ngx_http_token_meter_put_u64(prefix, subscriber);

    rc = ngx_http_token_meter_cursor_open(txn,
                                          NGX_HTTP_TOKEN_METER_DB_KEY_IDS,
                                          &cur);
    if (rc != NGX_OK) {
        return rc;
    }

    for (rc = ngx_http_token_meter_cursor_seek(cur, prefix, 8, &k, &v);
         rc == NGX_OK;
         rc = ngx_http_token_meter_cursor_next(cur, &k, &v))
    {
        if (k.len < 8 || ngx_memcmp(k.data, prefix, 8) != 0) {
            break;
        }

        if (v.len != 32 + sizeof(ngx_http_token_meter_key_info_t)) {
            rc = NGX_ERROR;
            break;
        }

        info = ngx_array_push(keys);
        if (info == NULL) {
            rc = NGX_ERROR;
            break;
        }

        ngx_memcpy(info, v.data + 32, sizeof(ngx_http_token_meter_key_info_t));
    }

    ngx_http_token_meter_cursor_close(cur);

    return (rc == NGX_ERROR || rc == NGX_HTTP_TOKEN_METER_FULL) ? rc : NGX_OK;
}


ngx_int_t
ngx_http_token_meter_balance(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_subscriber_t *sub, time_t now,
    ngx_http_token_meter_balance_t *balance)
{
    ngx_int_t  rc;

    ngx_memzero(balance, sizeof(ngx_http_token_meter_balance_t));

    rc = ngx_http_token_meter_grants_walk(txn, sub->id, now, balance, NULL);
    if (rc != NGX_OK) {
        return rc;
    }

    balance->paid = sub->paid;
    balance->reserved = sub->reserved;
    balance->available = sub->paid + balance->grants - sub->reserved;

    if (balance->available < 0) {
        balance->available = 0;
    }

    return NGX_OK;
}


/*
 * Takes points from the unexpired grants, earliest expiry first, then from
 * paid points.  The caller has checked that the balance covers them and
 * stores the changed subscriber record.
 */

ngx_int_t
ngx_http_token_meter_debit(ngx_http_token_meter_txn_t *txn,
    ngx_http_token_meter_subscriber_t *sub, int64_t points, time_t now,
    int64_t *from_grants, int64_t *from_paid)
{
    int64_t                         left;
    ngx_int_t                       rc;
    ngx_http_token_meter_balance_t  balance;

    left = points;

    rc = ngx_http_token_meter_grants_walk(txn, sub->id, now, &balance, &left);
    if (rc != NGX_OK) {
        return rc;
    }

    *from_grants = points - left;

    if (left > sub->paid) {
        left = sub->paid;
    }

    *from_paid = left;

    sub->paid -= left;
    sub->spent_grants += *from_grants;
    sub->spent_paid += *from_paid;

    return NGX_OK;
}


static ngx_int_t
ngx_http_token_meter_grants_walk(ngx_http_token_meter_txn_t *txn,
    uint64_t subscriber, time_t now, ngx_http_token_meter_balance_t *balance,
    int64_t *debit)
{
    int64_t                         take;
    u_char                          prefix[8], key[24];
    ngx_int_t                       rc;
    ngx_str_t                       k, v;
    ngx_http_token_meter_grant_t    grant;
    ngx_http_token_meter_cursor_t  *cur;

    ngx_memzero(balance, sizeof(ngx_http_token_meter_balance_t));

    ngx_http_token_meter_put_u64(prefix, subscriber);

    rc = ngx_http_token_meter_cursor_open(txn, NGX_HTTP_TOKEN_METER_DB_GRANTS,
                                          &cur);
    if (rc != NGX_OK) {
        return rc;
    }

    for (rc = ngx_http_token_meter_cursor_seek(cur, prefix, 8, &k, &v);
         rc == NGX_OK;
         rc = ngx_http_token_meter_cursor_next(cur, &k, &v))
    {
        if (k.len != 24 || ngx_memcmp(k.data, prefix, 8) != 0) {
            break;
        }

        if (v.len != sizeof(ngx_http_token_meter_grant_t)) {
            rc = NGX_ERROR;
            break;
        }

        ngx_memcpy(&grant, v.data, sizeof(ngx_http_token_meter_grant_t));

        if (grant.expires <= now) {
            balance->expired += grant.left;
            continue;
        }

        if (debit && *debit > 0 && grant.left > 0) {
            take = ngx_min(*debit, grant.left);

            grant.left -= take;
            *debit -= take;

            ngx_memcpy(key, k.data, 24);

            rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_GRANTS,
                                          key, 24, &grant, sizeof(grant), 0);
            if (rc != NGX_OK) {
                break;
            }

            /* a put may move the cursor's page: find our place again */

            rc = ngx_http_token_meter_cursor_seek(cur, key, 24, &k, &v);
            if (rc != NGX_OK) {
                break;
            }
        }

        balance->grants += grant.left;

        if (balance->ngrants < NGX_HTTP_TOKEN_METER_MAX_GRANTS) {
            balance->grant[balance->ngrants++] = grant;
        }
    }

    ngx_http_token_meter_cursor_close(cur);

    return (rc == NGX_ERROR || rc == NGX_HTTP_TOKEN_METER_FULL) ? rc : NGX_OK;
}


ngx_int_t
ngx_http_token_meter_purchase_get(ngx_http_token_meter_txn_t *txn,
    ngx_str_t *reference, ngx_http_token_meter_purchase_t *purchase,
    ngx_str_t *result)
{
    ngx_int_t  rc;
    ngx_str_t  v;

    rc = ngx_http_token_meter_get(txn, NGX_HTTP_TOKEN_METER_DB_PURCHASES,
                                  reference->data, reference->len, &v);
    if (rc != NGX_OK) {
        return rc;
    }

    if (v.len < sizeof(ngx_http_token_meter_purchase_t)) {
        return NGX_ERROR;
    }

    ngx_memcpy(purchase, v.data, sizeof(ngx_http_token_meter_purchase_t));

    result->data = v.data + sizeof(ngx_http_token_meter_purchase_t);
    result->len = v.len - sizeof(ngx_http_token_meter_purchase_t);

    return NGX_OK;
}


ngx_int_t
ngx_http_token_meter_purchase_put(ngx_http_token_meter_txn_t *txn,
    ngx_str_t *reference, ngx_http_token_meter_purchase_t *purchase,
    ngx_str_t *result)
{
    u_char     *buf;
    size_t      len;
    ngx_int_t   rc;

    len = sizeof(ngx_http_token_meter_purchase_t) + result->len;

    buf = ngx_alloc(len, ngx_cycle->log);
    if (buf == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(buf, purchase, sizeof(ngx_http_token_meter_purchase_t));
    ngx_memcpy(buf + sizeof(ngx_http_token_meter_purchase_t), result->data,
               result->len);

    rc = ngx_http_token_meter_put(txn, NGX_HTTP_TOKEN_METER_DB_PURCHASES,
                                  reference->data, reference->len, buf, len,
                                  1);

    ngx_free(buf);

    return rc;
}
