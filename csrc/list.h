/* list.h - intrusive doubly linked lists: O(1) insert and unlink anywhere. */
#ifndef PP_LIST_H
#define PP_LIST_H

#include <stddef.h>

/* A list head is a pp_link pointing at itself when empty; an element's link
 * is all NULL while it is on no list. */
typedef struct pp_link {
    struct pp_link *prev, *next;
} pp_link;

#define PP_CONTAINER(ptr, type, member) \
    ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

static inline void pp__list_init(pp_link *head) { head->prev = head->next = head; }
static inline int pp__list_empty(const pp_link *head) { return head->next == head; }
static inline int pp__linked(const pp_link *l) { return l->next != NULL; }

static inline void pp__list_unlink(pp_link *l)
{
    if (l->next == NULL)
        return;
    l->prev->next = l->next;
    l->next->prev = l->prev;
    l->prev = l->next = NULL;
}

/* Appends l (on no list) at the tail. */
static inline void pp__list_append(pp_link *head, pp_link *l)
{
    l->prev = head->prev;
    l->next = head;
    head->prev->next = l;
    head->prev = l;
}

/* Moves l (on any list or none) to the tail of head. */
static inline void pp__list_move_tail(pp_link *head, pp_link *l)
{
    pp__list_unlink(l);
    pp__list_append(head, l);
}

/* The first element's link, or NULL when empty. */
static inline pp_link *pp__list_first(const pp_link *head)
{
    return head->next == head ? NULL : head->next;
}

#endif
